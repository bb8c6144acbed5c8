"""N-gram proposer (prompt lookup): no model, on the host.

    history:  ... A B C D ... x y A B C | (next?)
                        ^ earlier occurrence of the suffix "A B C"
    drafts:   D ...  (the tokens that followed it, up to num_spec_slots)

The longest suffix of the request's tokens (prompt + output), between prompt_lookup_min and
prompt_lookup_max tokens, that also occurs earlier; of its occurrences the latest wins. It pays
off when the output copies its input (extraction, editing, code, retrieval-augmented answers).

Cost per request and step: `NgramIndex` keeps, per request, the latest end position of every
s-gram of its history (s in [prompt_lookup_min, prompt_lookup_max]), extended by the tokens new
since the last step; a lookup is a few dict probes. `lookup` is the same search in numpy over
the whole history (the reference the tests compare against, and `pdserve bench spec --sweep`'s).
"""

from __future__ import annotations

import numpy as np

from pdserve.common.config import SpeculativeConfig
from pdserve.common.engine.outputs import ScheduledRequest


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` [L] of length in [min_n, max_n]; empty when there is none."""
    length = len(tokens)
    if length < min_n + 1:
        return tokens[:0]
    cand = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])  # j: tokens[j] == last token
    best = cand if min_n <= 1 and cand.size else None
    for m in range(1, min(max_n, length - 1)):  # extend every candidate one token to the left
        cand = cand[cand >= m]
        cand = cand[tokens[cand - m] == tokens[length - 1 - m]]
        if not cand.size:
            break
        if m + 1 >= min_n:
            best = cand
    if best is None:
        return tokens[:0]
    start = int(best[-1]) + 1
    return tokens[start:start + k]


class NgramIndex:
    """One request's history and, per suffix length s in [min_n, max_n], a map from each s-gram to
    the end position of its latest occurrence, extended by the tokens new since the last lookup.
    A lookup is then at most max_n - min_n + 1 dict probes, whatever the history's length (the
    numpy `lookup` compares the whole history and filters its candidates: ~15 array calls a
    step), and an update costs max_n - min_n + 1 inserts per new token. Same answers as `lookup`:
    a shorter suffix occurs wherever a longer one does, so the longest length found first wins,
    and inserting end positions in increasing order keeps the latest occurrence of each s-gram.
    Memory: (max_n - min_n + 1) entries per history token."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._latest: dict[int, dict[tuple, int]] = {n: {} for n in range(min_n, max_n + 1)}  # s -> s-gram -> end
        self._num_indexed = 0  # end positions [0, _num_indexed) are in _latest

    def extend(self, new_tokens) -> None:
        self.tokens.extend(new_tokens)

    def lookup(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        length in [min_n, max_n]; [] when there is none."""
        tokens, length = self.tokens, len(self.tokens)
        for end in range(self._num_indexed, length - 1):  # index every end but the last (the suffix's)
            for n, latest in self._latest.items():
                if end + 1 >= n:
                    latest[tuple(tokens[end + 1 - n:end + 1])] = end
        self._num_indexed = max(self._num_indexed, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._latest[n].get(tuple(tokens[length - n:]))
            if end is not None:
                return tokens[end + 1:end + 1 + k]
        return []


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._indexes: dict[str, NgramIndex] = {}  # req_id -> its history's index

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._indexes.pop(req_id, None)

    def propose(self, reqs: list[ScheduledRequest]) -> dict[str, tuple[list[int], None]]:
        """req_id -> (up to num_spec_slots drafts, no draft probabilities: one-hot)."""
        drafts = {}
        for s in reqs:
            found = self._index(s).lookup(s.num_spec_slots)
            if found:
                drafts[s.req_id] = (found, None)
        return drafts

    def _index(self, s: ScheduledRequest) -> NgramIndex:
        """The request's index, extended by its tokens new since the last step (prompt + output)."""
        num_prompt = len(s.prompt_token_ids)
        total = num_prompt + len(s.output_token_ids)
        index = self._indexes.get(s.req_id)
        if index is None or len(index.tokens) > total:  # new (or a history that shrank: start over)
            index = self._indexes[s.req_id] = NgramIndex(self.min_n, self.max_n)
        n = len(index.tokens)
        if n < num_prompt:
            index.extend(s.prompt_token_ids[n:])
            n = num_prompt
        index.extend(s.output_token_ids[n - num_prompt:])
        return index
