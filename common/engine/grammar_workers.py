"""The threads that fill a step's grammar mask rows beside the engine thread (mask_fill.py).

xgrammar's calls release the GIL (tvm-ffi's default) and a mask row is long (on the 2-core dev
box, within a JSON string, 128256 wide: ~100-300 us), so the rows of a step are filled in
parallel. Two knobs, both in the manager (StructuredOutputManager(num_threads=, num_shares=)):

    num_shares   Python worker threads; the rows are split into strided shares, one xgrammar
                 call each (rows k, k + n, ...). Each share costs two GIL hand-offs (its start,
                 its return), which an engine thread busy in Python can delay by up to the 5 ms
                 switch interval: few shares, default 1.
    num_threads  threads filling rows in all: each share's `BatchGrammarMatcher` spreads its rows
                 over num_threads // num_shares of xgrammar's own C++ threads (no GIL there).

    submit(fn, shares)  fn(k, share k) on the workers; returns the futures at once
    accept_in_parallel  the previous step's tokens accepted by up to 4 threads at once (the
                        engine thread and MAX_ACCEPT_THREADS more), waited for
    batcher(k)          share k's BatchGrammarMatcher (created once)
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
MIN_ROWS_PER_SHARE = 4  # a hand-off costs tens of us; a row, hundreds
ACCEPT_ROWS_PER_THREAD = 16  # accept_in_parallel: a row's accept costs ~35 us, a hand-off tens
MAX_ACCEPT_THREADS = 3  # besides the engine thread


class GrammarWorkers:
    def __init__(self, num_threads: int, num_shares: int = 1):
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        if not 1 <= num_shares <= num_threads:
            raise ValueError(f"num_shares must be in [1, num_threads={num_threads}], got {num_shares}")
        self.num_threads = num_threads
        self.max_shares = num_shares
        self._pool: ThreadPoolExecutor | None = None  # num_shares workers, started on first use
        self._batchers: list = []  # xgrammar.BatchGrammarMatcher per share
        self._accept_pool: ThreadPoolExecutor | None = None  # accept_in_parallel, on first use

    def num_shares(self, num_rows: int) -> int:
        return max(1, min(self.max_shares, -(-num_rows // MIN_ROWS_PER_SHARE)))

    def submit(self, fn: Callable[[int, Sequence[T]], None], shares: list[Sequence[T]]) -> list[Future]:
        """fn(k, shares[k]) on the workers (at most max_shares of them); returns at once."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_shares, thread_name_prefix="pdserve-grammar")
        return [self._pool.submit(fn, k, share) for k, share in enumerate(shares)]

    def accept_in_parallel(self, pending: list, accept: Callable[[list], None]) -> None:
        """accept(chunk) over pending's rows split into chunks of >= ACCEPT_ROWS_PER_THREAD,
        the first on the calling thread and the others on accept threads at once (xgrammar's
        batched accept runs one matcher after another, ~35 us a row of a JSON grammar: 64 rows
        were 2-2.5 ms of the engine thread per step on the H200 host). Returns when all ended;
        raises the first error."""
        num = max(1, min(MAX_ACCEPT_THREADS + 1, len(pending) // ACCEPT_ROWS_PER_THREAD))
        if num == 1:
            accept(pending)
            return
        chunks = [pending[k::num] for k in range(num)]
        if self._accept_pool is None:
            self._accept_pool = ThreadPoolExecutor(MAX_ACCEPT_THREADS, thread_name_prefix="pdserve-accept")
        futures = [self._accept_pool.submit(accept, chunk) for chunk in chunks[1:]]
        try:
            accept(chunks[0])
        finally:
            for future in futures:
                future.exception()  # wait for every chunk, whatever happened here
        for future in futures:
            future.result()

    def batcher(self, k: int):
        """Share k's BatchGrammarMatcher with num_threads // max_shares C++ threads."""
        while len(self._batchers) <= k:
            import xgrammar
            self._batchers.append(xgrammar.BatchGrammarMatcher(max(1, self.num_threads // self.max_shares)))
        return self._batchers[k]
