"""The n-gram proposer's incremental index (spec_decode/ngram.py) gives exactly the numpy
`lookup`'s drafts, fed the history a few tokens at a time as the engine feeds it; the proposer
starts a request's index over when its history shrinks and drops it when told."""

from __future__ import annotations

import random

import numpy as np

from pdserve.common.config import SpeculativeConfig
from pdserve.common.engine.outputs import ScheduledRequest
from pdserve.common.engine.spec_decode.ngram import NgramIndex, NgramProposer, lookup
from pdserve.common.sampling_params import SamplingParams


def test_index_equals_numpy_lookup_on_random_streams():
    rng = random.Random(0)
    num_found = 0
    for _ in range(300):
        vocab = rng.choice([2, 3, 5, 20])  # small vocabularies: many and long matches
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(1, 100))]
        lo = rng.randint(1, 4)
        hi, k = rng.randint(lo, 5), rng.randint(1, 8)
        index, pos = NgramIndex(lo, hi), 0
        while pos < len(seq):
            step = rng.randint(1, 5)
            index.extend(seq[pos:pos + step])
            pos = min(pos + step, len(seq))
            got = index.lookup(k)
            assert got == lookup(np.asarray(seq[:pos], np.int32), lo, hi, k).tolist(), (seq[:pos], lo, hi, k)
            num_found += bool(got)
    assert num_found > 1000  # the comparison covered matches, not only misses


def test_index_prefers_the_longest_suffix_then_the_latest_occurrence():
    index = NgramIndex(1, 3)
    index.extend([5, 6, 7, 1, 6, 7, 2, 9, 7, 3, 6, 7])
    assert index.lookup(2) == [2, 9]  # "6 7" (at 1-2 and 4-5; the latest: 4-5) beats the later "7" at 8
    index.extend([8])
    assert index.lookup(4) == []  # 8 never occurred before
    index.extend([5, 6])
    assert index.lookup(3) == [7, 1, 6]  # "8 5 6" no, "5 6" at 0-1


def _scheduled(req_id: str, prompt: list[int], output: list[int], slots: int) -> ScheduledRequest:
    return ScheduledRequest(req_id=req_id, input_token_ids=[output[-1]], start_pos=len(prompt) + len(output) - 1,
                            block_ids=[0], sample=True, params=SamplingParams(temperature=0),
                            prompt_token_ids=prompt, output_token_ids=output, num_spec_slots=slots)


def test_proposer_follows_growing_history_restarts_when_it_shrinks_and_forgets():
    proposer = NgramProposer(SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                               prompt_lookup_min=1, prompt_lookup_max=2))
    prompt, output = [1, 2, 3, 4, 1, 2], [3]
    assert proposer.propose([_scheduled("a", prompt, output, 3)]) == {"a": ([4, 1, 2], None)}
    output += [4, 9]  # two more accepted tokens: the index takes only the new ones
    assert proposer.propose([_scheduled("a", prompt, output, 2)]) == {}
    assert len(proposer._indexes["a"].tokens) == 9
    # another history under the same id, shorter (a resubmitted request): built anew
    assert proposer.propose([_scheduled("a", [7, 3, 7], [3], 2)]) == {"a": ([7, 3], None)}
    proposer.forget(["a"])
    assert "a" not in proposer._indexes
