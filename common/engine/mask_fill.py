"""A step's token-mask fill, run on worker threads beside the engine thread's own host work.

With overlapped steps a grammar row's mask for step k needs the token step k-1 sampled, which
reaches the host only when step k-1 has run on the device. The fill then takes milliseconds at
batch 64 (xgrammar: accepting a token ~20-40 us per row, a 128256-wide mask row ~100-300 us), and
the engine thread has its own milliseconds of host work per step (step k-1's update and outputs,
scheduling step k+1, its inputs). Serially they exceeded the device's step; here they overlap:

    engine thread                                        worker threads (one strided share each)
    launch(k): forward k queued, start_fill(k) ---------> wait for step k-1's tokens   (device time)
    complete(k-1): wait for its tokens                    accept them (one batched xgrammar call)
                   scheduler.update(k-1)                  --> `accepted` event of the share
                   manager.update(k-1): waits `accepted`  fill the share's mask rows (one batched
                   outputs                                call), allowed_token_ids, bad_words
    schedule(k+1), step k+1's host inputs
    launch(k+1): MaskFill.join() -> bitmask k, its copy and step k's sampler queued, forward k+1

Few GIL hand-offs per share: xgrammar releases the GIL inside its calls, and a worker that comes
back from one must win the GIL from an engine thread running Python (which, busy, keeps it up to
the interpreter's 5 ms switch interval), so a share makes two batched xgrammar calls, not two per
row, and runs its Python where the engine thread is blocked: between the tokens and the fill call
the engine thread waits in update() for `accepted`, set just before the fill call; after the fill
only the share's allowed_token_ids / bad_words rows and its return remain, which run once the
engine thread blocks in join. Only a share's own rows' states are touched by its worker; the
engine thread reads a state's accepted count only after that share's `accepted` event (update) or
after join (the next start_fill).

A matcher terminates only by accepting a stop token (xgrammar: where the grammar may end), so
`terminated` is asked of the matcher only after a stop token; a terminated or broken row is left
unmasked (the request is ending: its token is dropped or it fails).
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
    inflight: bool  # then the token the previous step sampled for it (read by the worker)
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
    """One step's fill in flight: `wait_accepted()` (the previous step's tokens are in the
    matchers), `join()` -> the bitmask on the manager's device (idempotent; raises a share's
    error). A share no worker has started yet when the engine thread waits for it is taken
    back and run on the engine thread (a busy host: no wait for a thread to be scheduled)."""

    def __init__(self, rows: list[Row], bitmask: torch.Tensor, inflight_token: Callable[[str], int] | None,
                 stop_ids: frozenset[int], workers: GrammarWorkers, batchers: list,
                 finish: Callable[["MaskFill", torch.Tensor], torch.Tensor]):
        self.rows = rows
        self.state_ids = {id(r.state) for r in rows}
        self._bitmask = bitmask  # host [B, W] int32, all ones
        self._inflight_token = inflight_token
        self._stop_ids = stop_ids
        self._batchers = batchers  # one xgrammar BatchGrammarMatcher per share
        self._finish = finish  # manager: host bitmask -> device tensor, stats
        self.started_at = time.perf_counter()
        self.tokens_at: list[float] = []  # per share: its in-flight tokens known on the host
        self.accepted_at: list[float] = []  # per share: its matchers advanced
        self.done_at: list[float] = []  # per share: its rows filled
        self.joined_at: float | None = None  # the engine thread asked for the bitmask
        self.num_taken_back = 0  # shares the engine thread ran itself
        self._result: torch.Tensor | None = None
        num = workers.num_shares(len(rows))
        self._shares = [rows[k::num] for k in range(num)]
        self._accepted = [threading.Event() for _ in range(num)]
        self._errors: list[BaseException | None] = [None] * num
        self._taken = [False] * num  # share k ran on the engine thread
        self._futures = workers.submit(self._run_share, rows, num)

    def wait_accepted(self) -> None:
        for k, event in enumerate(self._accepted):
            if not self._take_back(k):
                event.wait()

    def wait_done(self, raise_error: bool = True) -> None:
        for k, f in enumerate(self._futures):
            if not self._take_back(k):
                f.result()
        error = next((e for e in self._errors if e is not None), None)
        if error is not None and raise_error:
            raise error

    def _take_back(self, k: int) -> bool:
        """Run share k here if no worker has started it: -> True when it ran here (now or before)."""
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
            self.wait_done()
            self._result = self._finish(self, self._bitmask)
        return self._result

    def _run_share(self, k: int, share: list[Row]) -> None:
        """Share k (a worker, or the engine thread taking it back): the share's in-flight tokens,
        accepted in one call, then its mask rows. The `accepted` event is set just before the
        fill call, which releases the GIL: the engine thread, blocked on that event in update(),
        then runs while this worker fills. An error is kept for join()."""
        try:
            self._advance_share(k, share)
        except BaseException as e:
            self._errors[k] = e
        finally:
            self._accepted[k].set()  # (normally set already)

    def _advance_share(self, k: int, share: list[Row]) -> None:
        inflight = {}
        if self._inflight_token is not None:  # the first lookup waits for the previous step
            inflight = {r.req_id: self._inflight_token(r.req_id) for r in share if r.inflight}
        self.tokens_at.append(time.perf_counter())
        accept_tokens([(r.state, r.known + [inflight[r.req_id]] if r.inflight else r.known)
                       for r in share if r.state.matcher is not None and (r.known or r.inflight)], self._stop_ids)
        live = [r for r in share if r.state.matcher is not None and not r.state.broken and not r.state.terminated]
        self.accepted_at.append(time.perf_counter())
        self._accepted[k].set()
        if live:
            self._batchers[k].batch_fill_next_token_bitmask([r.state.matcher for r in live], self._bitmask,
                                                            [r.index for r in live])
        bits = self._bitmask.numpy().view(np.uint32)  # same memory, unsigned for bit arithmetic
        for r in share:
            state = r.state
            if state.allowed is not None:
                bits[r.index] &= state.allowed
            if state.bad_words:
                tail = r.tail + [inflight[r.req_id]] if r.inflight else r.tail
                for word in state.bad_words:
                    if len(word) == 1 or tuple(tail[-(len(word) - 1):]) == word[:-1]:
                        t = word[-1]
                        bits[r.index, t >> 5] &= np.uint32(~(1 << (t & 31)) & 0xFFFFFFFF)
        self.done_at.append(time.perf_counter())
