"""Python's cyclic garbage collector in a serving process.

Under load a worker allocates many short-lived objects per token (engine outputs, protobuf
messages, futures, stream items). With CPython's default thresholds (700, 10, 10) a young
collection runs every 700 net allocations and a full one every 70,000, and a full collection
walks every tracked object of the process: the modules, the model's Python objects, the
tokenizer, the engine's request tables. Profiled with py-spy (--gil --native) on a 1P1D stack
at 15 req/s, 42 % of the decode worker's GIL time was `gc_collect_main`.

So each server process (worker, serve, router), once built and before it reports ready:
- `freeze_startup_objects()`: everything allocated so far moves to the permanent generation
  (gc.freeze), so later collections never walk it again (it stays alive anyway);
- `tune_gc()` (every pdserve process, services/entry.py): the first generation is collected per
  GEN0_THRESHOLD net allocations instead of 700 (objects of one step die by refcount long before;
  what the collector finds is the odd cycle).

Not done for library use (`LLM`, tests): frozen objects are never collected, and a test process
builds and drops many engines.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def freeze_startup_objects() -> None:
    gc.collect()  # what is garbage already goes now, not into the permanent generation
    gc.freeze()
