"""How speculative steps overlap the device (EngineCore._step_speculative, async scheduling on).

A step's drafts are proposed from the tokens of the step before, so a verify step cannot be
scheduled while the step before it runs, as a plain decode is (engine_core.py). What can still
hide behind the device is everything that comes after a step's tokens are known and before the
next step needs them: the deltas, and the caller's work on them (detokenizing, streaming).

    step() k:  result(k-1), update(k-1)          # its tokens: k's proposals and KV rollback need them
               schedule(k), propose, launch(k)   # queued on the device
               deltas(k-1) -> caller             # while the device runs k

A launched step that drafted nothing (the n-gram lookup found no match for any request) lets
the next one launch first, as plain async scheduling does; that next step cannot draft (its
input token is in flight: `max_draft_tokens` gives 0), and the step after it tries again:

    step() k+1: schedule(k+1), launch(k+1)       # input of k+1 filled on the device from k
                result(k), update(k), deltas(k)
    step() k+2: result(k+1) ... as above         # proposes again

So in stretches where the lookup finds nothing, every other step hides its host work behind the
device, at the price of one proposal skipped per two steps. Outputs do not change: greedy tokens
do not depend on the step boundaries, and seeded draws depend on (seed, position) only.

Only for the n-gram proposer: a draft model at temperature > 0 drafts even without draft slots
(decoder.py), from a history that would miss the token in flight.
"""

from __future__ import annotations


def can_overlap_next(spec) -> bool:
    """The step just launched (by the runner owning `spec`, a SpecDecoder) drafted nothing, and
    the proposer needs no history on the device: the next step may launch before its result."""
    return spec.draft is None and not spec.has_drafts()
