"""split_step (common/models/tp_overlap.py): a step's requests cut into two halves of whole
requests, decodes with the first, near half the tokens each, every array sliced consistently.
The forward over the halves is checked end to end in tests/engine/test_tensor_parallel.py."""

from __future__ import annotations

import numpy as np

from pdserve.common.models.attention import StepInputs
from pdserve.common.models.tp_overlap import split_step


def make_step(num_decodes: int, prompt_lens: list[int]) -> StepInputs:
    lens = [1] * num_decodes + prompt_lens
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t = int(qsl[-1])
    ctx = np.array([50 + n for n in lens], np.int32)
    table = np.arange(len(lens) * 4, dtype=np.int32).reshape(len(lens), 4)
    return StepInputs(num_decodes, np.arange(t, dtype=np.int32), np.arange(t, dtype=np.int32) % 97,
                      np.arange(t, dtype=np.int32) + 1000, qsl, ctx, table, np.array(qsl[1:] - 1, np.int32))


def test_halves_of_whole_requests_near_half_the_tokens():
    step = make_step(3, [900, 700, 1200, 400])  # 3,203 tokens: the cut after 700 (1,603 / 1,600)
    a, b = split_step(step, min_tokens=2048)
    assert (a.num_decodes, a.num_reqs, b.num_decodes, b.num_reqs) == (3, 5, 0, 2)
    assert a.num_tokens == 3 + 900 + 700 and a.num_tokens + b.num_tokens == step.num_tokens
    for name in ("input_ids", "positions", "slot_mapping"):
        joined = np.concatenate([getattr(a, name), getattr(b, name)])
        assert np.array_equal(joined, getattr(step, name)), name
    assert np.array_equal(a.query_start_loc, step.query_start_loc[:6])
    assert np.array_equal(b.query_start_loc, [0, 1200, 1600])
    assert np.array_equal(np.concatenate([a.context_lens, b.context_lens]), step.context_lens)
    assert np.array_equal(np.concatenate([a.block_table, b.block_table]), step.block_table)
    assert a.sample_rows.size == b.sample_rows.size == 0


def test_no_split_for_one_prompt_or_a_small_step():
    assert split_step(make_step(10, [4000]), min_tokens=2048) is None       # one prompt (+ decodes)
    assert split_step(make_step(0, [600, 600, 600]), min_tokens=2048) is None  # 1,800 tokens
    a, b = split_step(make_step(0, [600, 600, 900]), min_tokens=2048)
    assert (a.num_reqs, b.num_reqs) == (2, 1)
