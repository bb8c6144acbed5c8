"""How speculative steps overlap the device (EngineCore._step_speculative, async scheduling on).

A verify step's tokens (how many drafts were accepted) decide where the next step starts. With a
draft model (or BRIDGE off) the step after a verify step is scheduled only once its result is on
the host; what hides behind the device then is everything after a step's tokens are known that
the next launch does not need: the deltas, and the caller's work on them (detokenizing,
streaming). With n-gram drafts a bridge step runs instead (below).

    step() k:  result(k-1), update(k-1)          # k-1 verified drafts: k's start depends on it
               schedule(k), propose, launch(k)   # queued on the device
               deltas(k-1) -> caller             # while the device runs k

A launched step that drafted nothing (a plain step: the n-gram lookup found no match for any
request) advances every request by exactly one token, so the next step is scheduled and launched
before its result, as plain async scheduling does. Its input token is in flight (filled on the
device from k's sampled tokens), but it may still verify drafts: the lookup runs on the history
without that token and asks for one token more; the first one found guesses the token in flight
and is dropped, the others are drafts for the positions after it (ngram.py):

    step() k+1: schedule(k+1), propose, launch(k+1)   # inputs [x?, d1 .. dn], x filled on the device
                result(k), update(k), deltas(k)       # x known now
    step() k+2: if k+1 drafted (guesses right): result(k+1) ... as after any verify step
                else (nothing drafted, or every guess wrong): launch(k+2) first again

The target verifies d1 .. dn behind the real x, so a wrong guess never changes outputs, and once
result(k) shows it wrong (known before k+1's result) k+1's drafts for that request are dropped
(SpecDecoder.settle_guesses: its result is row 0's token alone); with no drafts left to wait
for, k+2 launches before k+1's result, as after a plain step. Outputs do not change (greedy
tokens do not depend on the step boundaries, seeded draws on (seed, position) only). The guesses
are counted (SpecDecodeStats.num_guess_hits).
In stretches without matches every step hides its host work behind the device and still looks
up drafts.

Bridge steps (BRIDGE): a verify step k with drafts d1 .. dn for a request (input t at position
p) decides the tokens at p+1 .. p+a+1 (a accepted drafts, then x_a, the target's token at row
a); its rows' tokens x_0 .. x_n are on the device before the host knows a. Step k+1 launches
before k's result with n + 1 rows for that request, [x_0 .. x_n] at positions p+1 .. p+n+1
(filled on the device from k's readback): whatever a is, row a's prefix holds the right tokens
(rows j < a rewrite the accepted drafts' KV with the same tokens, x_j = d_{j+1}) and its input
x_a is the token at p+a+1, so row a samples the token at p+a+2 (seeded draws by position, as
always). Once k's result is applied (before k+1's), the request's token from k+1 is row a's
(SpecDecoder._when_verified, settled in can_overlap_next on the engine thread), the rows past
it wrote KV past the request's tokens (never read, rewritten later) and k+2 launches before
k+1's result, as after a plain step (drafting past a guess of that token). So no step waits for
a verify step's result with the device idle; the bridge costs a step of n + 1 rows (on CUDA the
graph bucket of a verify step) for one token.

    step() k+1: schedule, launch(k+1)            # rows [x_0 .. x_n]: the scheduler sees one token in flight
                result(k), update(k)             # a known: k+1's token is row a's
    step() k+2: launch(k+2) first, result(k+1)   # k+2's input is row a's token, filled on the device

The scheduler reserves draft slots for k+1 past the token in flight (max_draft_tokens); if it
reserved fewer than n (the pool or the token budget short) and k accepts more drafts than
k+1 has rows, the request gets no token from k+1 (RunnerOutput.void_req_ids: update() takes
its token in flight back) and k+2 waits for k+1's result.

Only for the n-gram proposer: a draft model drafts from the history on the device, which would
miss the token in flight, so its steps never launch before the previous result.

Off by default (`overlaps`: below OVERLAP_MAX_BATCH running requests, which is 1): no step
launches before the previous result, but a step's deltas still go out after the next launch
(the first form above, for n-gram too: the caller's work on them, detokenizing and streaming,
runs while the device computes; before 2026-12-03 EngineCore.step drained each step and
returned its deltas with the device idle until the next call). One H200, SmolLM2
bf16, k = 8: at batch 16 the overlapped engine made 0.73x of plain decoding where one-at-a-time
steps made 1.05x (its verify steps' host 1.73 ms against 1.02: the guessed rows and drafts of 16
requests whose tokens are in flight, and a verify step waiting behind a plain one), so it was
kept to batches of 1-3; at batch 1 it then lost too, in every run since bridge steps came:
1.17x / 1.28x (overlapped / one at a time), 1.19x / 1.33x, and 1.34x / 1.59x once a verify step
of 9 rows got its own graph and the small-batch GEMVs (2026-12-01). Overlapped, only ~half of
the guesses are right (96 of 206) and a bridge step yields one token, so it makes 1.48 tokens
per step against 2.06; the ~0.27 ms of host before a verify step that it hides costs less.
The mechanism stays (tests lift OVERLAP_MAX_BATCH to run it) for the day a bridge step also
carries drafts.
"""

from __future__ import annotations

from pdserve.common.engine.outputs import RunnerOutput
from pdserve.common.request import Request


OVERLAP_MAX_BATCH = 1  # from this many running requests on, speculative steps run one at a time (all: docstring)


def overlaps(num_running: int) -> bool:
    """Whether speculative steps overlap (async scheduling on) with this many running requests."""
    return num_running < OVERLAP_MAX_BATCH


BRIDGE = True  # after a verify step, launch a bridge step before its result (module docstring)


def can_overlap_next(spec, requests: dict[str, Request]) -> bool:
    """The step just launched (by the runner owning `spec`, a SpecDecoder) drafted nothing, or
    only past guesses that the result of the step before showed wrong (their drafts dropped:
    SpecDecoder.settle_guesses; `requests`: the scheduler's by id, that result applied), or its
    drafts are kept and the next step bridges them (BRIDGE); and the proposer needs no history on
    the device, and no bridged request of it went without a row: the next step may launch
    before its result."""
    if spec.draft is not None or spec.looped:
        return False
    void = spec.bridge_void()  # (settles a bridge step's rows: the result before it is applied)
    awaits = spec.settle_guesses(requests)
    return (BRIDGE or not awaits) and not void


def guess_hits(result: RunnerOutput, touched: list[Request]) -> list[bool]:
    """Per request of `result` that drafted past its token in flight (and is still running or
    just finished: in `touched`), whether the guess was that token (known since update())."""
    if not result.guessed_token_ids:
        return []
    by_id = {r.request_id: r for r in touched}
    return [by_id[req_id].all_token_ids[pos] == token
            for req_id, (pos, token) in result.guessed_token_ids.items() if req_id in by_id]
