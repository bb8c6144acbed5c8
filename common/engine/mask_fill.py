"""A step's token-mask fill: the engine thread accepts the tokens, worker threads fill the rows.

With overlapped steps a grammar row's mask for step k needs the token step k-1 sampled, which
reaches the host only when step k-1 has run on the device. At batch 64 the grammar's host work is
milliseconds (xgrammar: accepting a token ~10-40 us per row, a 128256-wide mask row ~100-300 us),
and the engine thread has its own milliseconds per step (step k-1's update and outputs, scheduling
step k+1, its inputs); serially they exceed the device's step. So they are split:

    engine thread                                        fill workers
    launch(k): forward k queued, start_fill(k)
               (rows snapshot; nothing runs yet)
    complete(k-1): its tokens on the host -> tokens_arrived():
                   ALL rows accept them: batched xgrammar
                   calls (GIL released), >16 rows split
                   over up to 4 threads at once
                   submit the shares, wait `started` ---> fill the share's rows: one batched call
                   scheduler.update(k-1)                  (GIL released; xgrammar may use its
                   manager.update(k-1): tokens consumed   own threads for it), then the share's
                   outputs                                allowed_token_ids / bad_words rows
    schedule(k+1), step k+1's host inputs
    launch(k+1): MaskFill.join() -> bitmask k, its copy and step k's sampler queued, forward k+1

`tokens_arrived()` runs on the engine thread where the previous step's `PendingOutput.result()`
resolves (the runner registers it there), so the accept needs no hand-off and no event wait; a
fill whose rows have nothing in flight (one-at-a-time steps, speculative verification) accepts
and starts at once; join() (or update()) runs it if nothing did.

GIL: a worker needs the GIL to start and to return, and an engine thread busy in Python keeps it
for up to the interpreter's 5 ms switch interval. So each share is ONE xgrammar call, the engine
thread waits (blocked, GIL released) until every share has entered its call before it goes on
(tens of us, instead of a worker stuck behind the scheduler), and the few Python lines after the
call run when the engine thread blocks in join. Fewer shares means fewer hand-offs: by default one
share whose `BatchGrammarMatcher` spreads the rows over xgrammar's own C++ threads (no GIL).

Only a share's own rows' matchers are read by its worker while the fill runs; the engine thread
accepts tokens only before the shares start, or, for a touched row of a running fill (never in
overlapped decode steps), after join. A matcher terminates only by accepting a stop token
(xgrammar: where the grammar may end), so `terminated` is asked of the matcher only after a stop
token; a terminated or broken row is left unmasked (the request is ending: its token is dropped or
it fails).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pdserve.common.engine.grammar_workers import GrammarWorkers

log = logging.getLogger("pdserve.structured")

MAX_BAD_WORD_CONTEXT = 64  # output tokens a bad word's prefix is compared with (longer words never match)
TAKE_BACK_AFTER_S = 0.005  # a share no worker has picked up by then runs on the engine thread


@dataclass
class RequestState:
    matcher: object | None  # xgrammar.GrammarMatcher
    allowed: np.ndarray | None  # uint32 [W] bitmask row of allowed_token_ids
    bad_words: list[tuple[int, ...]] = field(default_factory=list)
    num_accepted: int = 0  # output tokens the matcher has consumed
    terminated: bool = False  # the matcher accepted a stop token where the grammar may end
    broken: bool = False  # an output token the grammar rejects
    broken_reported: bool = False  # update() has named it (once)


@dataclass
class Row:
    """One sampled row of the step, as the engine thread saw it when the fill started."""
    index: int  # its bitmask row
    req_id: str
    state: RequestState
    known: list[int]  # output tokens on the host the matcher has not accepted yet
    inflight: bool  # then the token the previous step sampled for it (read in tokens_arrived)
    tail: list[int] | None  # the output's last MAX_BAD_WORD_CONTEXT tokens (bad words only)


def accept_tokens(pending: list[tuple[RequestState, list[int]]], stop_ids: frozenset[int]) -> None:
    """Feed each state's matcher its tokens: one batched xgrammar call per token position (a step
    adds one token, so normally one call). A token the grammar rejects, or any token after the
    grammar terminated, breaks the state."""
    if not pending:
        return
    import xgrammar
    k = 0
    while pending:
        accepted = xgrammar.BatchGrammarMatcher.batch_accept_token([st.matcher for st, _ in pending],
                                                                   [new[k] for _, new in pending])
        left = []
        for (state, new), ok in zip(pending, accepted):
            if not ok:  # a terminated matcher accepts nothing
                log.warning("output token %d does not match the request's grammar", new[k])
                state.broken = True
                continue
            state.num_accepted += 1
            if new[k] in stop_ids:
                state.terminated = state.matcher.is_terminated()
            if k + 1 < len(new):
                left.append((state, new))
        pending, k = left, k + 1


class MaskFill:
    """One step's fill: `tokens_arrived()` (engine thread: the previous step's tokens accepted by
    every row in one batched call, the shares started on the workers), `join()` -> the bitmask
    on the manager's device (idempotent; raises the accept's or a share's error). A share no
    worker has picked up TAKE_BACK_AFTER_S after its hand-off, or when join waits for it, runs
    on the engine thread (a starved host degrades to the serial fill, it does not wait)."""

    def __init__(self, rows: list[Row], bitmask: torch.Tensor, inflight_token: Callable[[str], int] | None,
                 stop_ids: frozenset[int], workers: GrammarWorkers,
                 finish: Callable[["MaskFill", torch.Tensor], torch.Tensor]):
        self.rows = rows
        self.state_ids = {id(r.state) for r in rows}
        self._bitmask = bitmask  # host [B, W] int32, all ones
        self._inflight_token = inflight_token
        self._stop_ids = stop_ids
        self._workers = workers
        self._finish = finish  # manager: host bitmask -> device tensor, stats
        self.accept_seconds = 0.0  # engine thread: the batched accept
        self.start_seconds = 0.0  # engine thread: the hand-off, until every share is inside its call
        self.started_at: float | None = None  # the tokens accepted, the shares handed to the workers
        self.done_at: list[float] = []  # per share: its rows filled
        self.joined_at: float | None = None  # the engine thread asked for the bitmask
        self.num_taken_back = 0  # shares the engine thread ran itself
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None  # the accept's (the previous step failed)
        self._futures: list | None = None  # None: not started
        self._shares: list[list[Row]] = []
        self._started: list[threading.Event] = []
        self._errors: list[BaseException | None] = []
        self._taken: list[bool] = []
        if not any(r.inflight for r in rows):  # every token on the host: start now
            self.tokens_arrived()

    def tokens_arrived(self) -> None:
        """Engine thread, once the previous step's tokens are on the host (no-op after the first
        call): every row accepts its tokens in one batched xgrammar call, then the fill starts on
        the workers; returns once every share is inside its xgrammar call (no worker is left
        waiting for the GIL behind the engine thread's Python)."""
        if self._futures is not None:
            return
        self._futures = []
        t0 = time.perf_counter()
        try:
            inflight = {}
            if self._inflight_token is not None:
                inflight = {r.req_id: self._inflight_token(r.req_id) for r in self.rows if r.inflight}
            self._workers.accept_in_parallel(
                [(r.state, r.known + [inflight[r.req_id]] if r.inflight else r.known)
                 for r in self.rows if r.state.matcher is not None and (r.known or r.inflight)],
                lambda chunk: accept_tokens(chunk, self._stop_ids))
        except BaseException as e:  # kept for join(): this step's sampler fails, as its input did
            self._error = e
            self.accept_seconds = time.perf_counter() - t0
            return
        for r in self.rows:
            if r.tail is not None and r.inflight:
                r.tail = r.tail + [inflight[r.req_id]]
        num_live = sum(r.state.matcher is not None and not r.state.broken and not r.state.terminated for r in self.rows)
        num = self._workers.num_shares(num_live)
        self._shares = [self.rows[k::num] for k in range(num)]
        self._started = [threading.Event() for _ in range(num)]
        self._errors = [None] * num
        self._taken = [False] * num
        self.started_at = time.perf_counter()
        self.accept_seconds = self.started_at - t0
        if num_live:
            self._futures = self._workers.submit(self._run_share, self._shares)
            for k, event in enumerate(self._started):  # a starved pool: the share runs here
                if not event.wait(TAKE_BACK_AFTER_S) and not self._take_back(k):
                    event.wait()
        else:  # allowed_token_ids / bad_words only: numpy rows, no hand-off
            self._futures, self._taken = [None], [True]
            self._run_share(0, self._shares[0])
        self.start_seconds = time.perf_counter() - self.started_at

    def cancel(self) -> None:
        """Never joined (its step failed): a fill not started stays so; a started one finishes."""
        if self._futures is None:
            self._futures = []
        self.wait_done(raise_error=False)

    def wait_done(self, raise_error: bool = True) -> None:
        for k, f in enumerate(self._futures or ()):
            if not self._take_back(k):
                f.result()
        error = self._error or next((e for e in self._errors if e is not None), None)
        if error is not None and raise_error:
            raise error

    def _take_back(self, k: int) -> bool:
        """Run share k here if no worker has picked it up: -> True when it ran here (now or before)."""
        if self._taken[k]:
            return True
        if not self._futures[k].cancel():  # running or done
            return False
        self._taken[k] = True
        self.num_taken_back += 1
        self._run_share(k, self._shares[k])
        return True

    def join(self) -> torch.Tensor:
        if self._result is None:
            self.joined_at = time.perf_counter()
            self.tokens_arrived()  # nothing resolved the previous step yet: its tokens now
            self.wait_done()
            self._result = self._finish(self, self._bitmask)
        return self._result

    def _run_share(self, k: int, share: list[Row]) -> None:
        """Share k (a worker, or the engine thread): its grammar rows filled in one batched call
        (`started` is set just before it; the call releases the GIL), then its allowed_token_ids
        and bad_words rows. An error is kept for join()."""
        try:
            live = [r for r in share if r.state.matcher is not None and not r.state.broken and not r.state.terminated]
            self._started[k].set()
            if live:
                self._workers.batcher(k).batch_fill_next_token_bitmask([r.state.matcher for r in live], self._bitmask,
                                                                       [r.index for r in live])
            bits = self._bitmask.numpy().view(np.uint32)  # same memory, unsigned for bit arithmetic
            for r in share:
                state = r.state
                if state.allowed is not None:
                    bits[r.index] &= state.allowed
                for word in state.bad_words:
                    if len(word) == 1 or tuple(r.tail[-(len(word) - 1):]) == word[:-1]:
                        t = word[-1]
                        bits[r.index, t >> 5] &= np.uint32(~(1 << (t & 31)) & 0xFFFFFFFF)
        except BaseException as e:
            self._errors[k] = e
        finally:
            self._started[k].set()  # (normally set already)
            self.done_at.append(time.perf_counter())
