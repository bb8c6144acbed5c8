"""The verification rule of speculative decoding (spec_decode/rejection.py) as a sampling
function: over many seeded draws, the first output token follows the target's processed
distribution (chi-square on a 6-token vocabulary), for one-hot (n-gram) drafts and for draft
distributions (Leviathan et al.), and also the token after an accepted draft; a draft
distribution equal to the target's is always accepted; with one-hot drafts a seeded row gives
exactly the plain sampler's token for that position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.common.engine.model_runner import position_seed
from pdserve.common.engine.outputs import ScheduledRequest
from pdserve.common.engine.sampler import Sampler, processed_probs
from pdserve.common.engine.spec_decode.rejection import DraftRows, verify
from pdserve.common.sampling_params import SamplingParams

V = 6
N = 6000
CHI2_CRIT = {5: 20.515, 4: 18.467, 3: 16.266, 2: 13.816}  # chi-square quantile 0.999 by degrees of freedom
TARGET_LOGITS = torch.tensor([1.2, 0.3, -0.5, 0.9, -1.5, 0.0])
DRAFT_PROBS = torch.tensor([0.05, 0.40, 0.25, 0.10, 0.15, 0.05])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was drawn"
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def target_probs(params: SamplingParams) -> torch.Tensor:
    row = ScheduledRequest("r", [0], 0, [0], True, params, [0], [])
    probs = processed_probs(TARGET_LOGITS[None], [row])[0]
    return probs / probs.sum()


def draw(num_rows: int, params: SamplingParams, draft_probs: torch.Tensor | None, one_hot_token: int | None = None,
         extra_draft: bool = False) -> list[list[int]]:
    """N requests (seeds 0..N-1) with num_rows - 1 fed drafts each (+ one for the last row), drawn
    from draft_probs, or all equal to one_hot_token."""
    rng = np.random.default_rng(123)
    logits = TARGET_LOGITS.repeat(N * num_rows, 1)
    reqs = []
    num_drafts = num_rows - 1 + extra_draft
    for i in range(N):
        if one_hot_token is not None:
            drafts = [one_hot_token] * num_drafts
        else:
            q = draft_probs.double().numpy()
            drafts = rng.choice(V, size=num_drafts, p=q / q.sum()).tolist()
        probs = None if draft_probs is None else draft_probs.repeat(num_drafts, 1)
        reqs.append(DraftRows(first_row=i * num_rows, num_rows=num_rows, draft_token_ids=drafts, draft_probs=probs,
                              params=SamplingParams(**{**params.__dict__, "seed": i}), first_position=40))
    shared = torch.Generator().manual_seed(0)
    return verify(logits, reqs, shared, position_seed)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)],
                         ids=["t1", "t0.7_topk4"])
@pytest.mark.parametrize("drafter", ["draft_probs", "one_hot"])
def test_first_token_follows_the_target_distribution(params, drafter):
    p = target_probs(params).numpy()
    q = processed_probs_like(params)
    outs = draw(2, params, q if drafter == "draft_probs" else None, one_hot_token=None if drafter == "draft_probs" else 1)
    first = np.bincount([o[0] for o in outs], minlength=V)
    stat, dof = chi_square(first, p)
    assert stat < CHI2_CRIT[dof], (stat, first, p)
    accepted = sum(len(o) > 1 for o in outs) / N
    assert 0.05 < accepted < 0.95  # some drafts accepted, some rejected: both branches were drawn


def processed_probs_like(params: SamplingParams) -> torch.Tensor:
    """A draft distribution processed like the target's (same top-k support)."""
    q = DRAFT_PROBS.clone()
    if params.top_k > 0:
        q[torch.argsort(TARGET_LOGITS, descending=True)[params.top_k:]] = 0  # keep the test's q within p's support
    return q / q.sum()


def test_token_after_an_accepted_draft_follows_the_target_distribution():
    """Two rows, the second with a draft of its own (a draft model at T > 0): given the first
    draft was accepted, the second token follows p too."""
    params = SamplingParams(temperature=1.0)
    p = target_probs(params).numpy()
    outs = draw(2, params, DRAFT_PROBS / DRAFT_PROBS.sum(), extra_draft=True)
    second = np.bincount([o[1] for o in outs if len(o) > 1], minlength=V)
    assert second.sum() > N / 10
    stat, dof = chi_square(second, p)
    assert stat < CHI2_CRIT[dof], (stat, second, p)


def test_a_draft_equal_to_the_target_is_always_accepted():
    params = SamplingParams(temperature=1.0)
    outs = draw(4, params, target_probs(params), extra_draft=True)
    assert all(len(o) == 4 for o in outs)


def test_one_hot_drafts_give_the_plain_samplers_token():
    """Seeded rows: the token at a position is the plain sampler's for that position, accepted
    draft or not (so n-gram speculation never changes a seeded request's output)."""
    sampler = Sampler(torch.device("cpu"))
    params = SamplingParams(temperature=0.9, top_p=0.9)
    outs = draw(1, params, None, one_hot_token=0)
    for i in range(200):
        gen = torch.Generator().manual_seed(position_seed(i, 40))
        row = ScheduledRequest("r", [0], 39, [0], True, SamplingParams(**{**params.__dict__, "seed": i}), [0], [])
        assert outs[i] == sampler.sample(TARGET_LOGITS[None], [row], (), [gen]).tolist()


def test_greedy_accepts_the_argmax_prefix():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    rows = DraftRows(first_row=0, num_rows=3, draft_token_ids=[1, 2], draft_probs=None,
                     params=SamplingParams(temperature=0), first_position=7)
    assert verify(logits, [rows], torch.Generator(), position_seed) == [[1, 0]]
    rows.draft_token_ids = [1, 0]
    assert verify(logits, [rows], torch.Generator(), position_seed) == [[1, 0, 2]]


def test_many_rows_accept_in_one_numpy_pass_as_per_row(monkeypatch):
    """From NUMPY_ROWS rows on, greedy / one-hot acceptance runs as one numpy pass: the same
    accepted drafts and next token per request as the per-row Python rule, for requests that
    accept none, some, all of their drafts, with 0 drafts, and next to a plainly sampled row."""
    from pdserve.common.engine.spec_decode import rejection
    gen = torch.Generator().manual_seed(3)
    reqs, row = [], 0
    for i in range(20):
        n = i % 6  # drafts fed
        drafts = torch.randint(0, V, (n,), generator=gen).tolist()
        reqs.append(DraftRows(first_row=row, num_rows=n + 1, draft_token_ids=drafts, draft_probs=None,
                              params=SamplingParams(temperature=0), first_position=0))
        row += n + 1 + (i % 4 == 0)  # some rows between requests (a plainly sampled request's)
    logits = torch.randn(row, V, generator=gen)
    for r in reqs:  # make request i accept about i % 3 of its drafts
        for j, d in enumerate(r.draft_token_ids[:reqs.index(r) % 3]):
            logits[r.first_row + j, d] = 10.0
    assert row >= rejection.NUMPY_ROWS
    fast = verify(logits, reqs, None, None)
    monkeypatch.setattr(rejection, "NUMPY_ROWS", 10 ** 9)
    slow = verify(logits, reqs, None, None)
    assert fast == slow
    assert {len(out) - 1 for out in fast} >= {0, 1, 2}  # none, one and two drafts accepted
