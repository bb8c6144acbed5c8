"""A step's matcher work split over threads: rows of a batch are independent.

xgrammar's calls release the GIL (tvm-ffi's default), and per row they are long (on the 2-core
dev box, within a JSON string of SmolLM2's vocabulary padded to 128256: accepting a token
~17-40 us, filling its mask ~100-300 us), so threads run them in parallel. xgrammar's own
`BatchGrammarMatcher` parallelizes the mask fill only; accepting the token in flight must come
first and is serial there. Here each thread takes a strided share of the rows and does both:

    rows 0..B-1 --> share k: rows k, k + n, k + 2n, ...   accept its tokens, fill its mask rows
                    (n = min(num_threads, ceil(B / MIN_ROWS_PER_THREAD)))

    run(fn, items)          the calling thread takes share 0 and waits for the rest (n = 1: no handoff)
    submit(fn, items, n)    every share on a worker; the caller goes on (mask_fill.py)
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
MIN_ROWS_PER_THREAD = 4  # a handoff costs tens of us; a row, hundreds


class GrammarWorkers:
    def __init__(self, num_threads: int):
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads
        self._pool: ThreadPoolExecutor | None = None  # num_threads workers, started on first use

    def num_shares(self, num_items: int) -> int:
        return max(1, min(self.num_threads, -(-num_items // MIN_ROWS_PER_THREAD)))

    def run(self, fn: Callable[[Sequence[T]], None], items: Sequence[T]) -> None:
        """fn(share) for strided shares of items, in parallel; returns when all are done and
        raises the first error of any share. fn must touch only its share's state."""
        n = self.num_shares(len(items))
        if n <= 1:
            fn(items)
            return
        futures = [self._workers().submit(fn, items[k::n]) for k in range(1, n)]
        try:
            fn(items[0::n])
        finally:
            for f in futures:  # every share is done before the caller reads the rows
                f.result()

    def submit(self, fn: Callable[[int, Sequence[T]], None], items: Sequence[T], num_shares: int) -> list[Future]:
        """fn(k, share k) on the workers for k < num_shares (at most num_threads); returns at once."""
        return [self._workers().submit(fn, k, items[k::num_shares]) for k in range(num_shares)]

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="pdserve-grammar")
        return self._pool
