"""N-gram proposer (prompt lookup): no model, numpy on the host.

    history:  ... A B C D ... x y A B C | (next?)
                        ^ earlier occurrence of the suffix "A B C"
    drafts:   D ...  (the tokens that followed it, up to num_spec_slots)

The longest suffix of the request's tokens (prompt + output), between prompt_lookup_min and
prompt_lookup_max tokens, that also occurs earlier; of its occurrences the latest wins. It pays
off when the output copies its input (extraction, editing, code, retrieval-augmented answers).

A request whose input token is still being sampled by the step in flight (PLACEHOLDER_TOKEN:
the engine launched this step before that one's result, pipeline.py) is looked up on the history
without it, one token further: the first token found guesses the one in flight and is dropped,
the rest are the drafts (for the positions after it). The device fills the real input token, so
a wrong guess costs acceptance, never correctness; `guesses` keeps each guess for the counters.

Cost per request and step: one vectorized compare of the last token against the history, then
`prompt_lookup_max` filters over the (few) candidate positions. The history is kept per request
as a growing int32 array, extended by the tokens new since the last step.
"""

from __future__ import annotations

import numpy as np

from pdserve.common.config import SpeculativeConfig
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, ScheduledRequest


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


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._history: dict[str, tuple[np.ndarray, int]] = {}  # req_id -> (buffer, tokens in it)
        self.guesses: dict[str, int] = {}  # the last proposal's: req_id -> its guess of the token in flight
        # req_id -> history length whose lookup found nothing: the step launched while a plain step
        # runs sees the same history (its token is in flight), so its lookup is skipped
        self._no_match: dict[str, int] = {}

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._history.pop(req_id, None)
            self._no_match.pop(req_id, None)

    def propose(self, reqs: list[ScheduledRequest]) -> dict[str, tuple[list[int], None]]:
        """req_id -> (up to num_spec_slots drafts, no draft probabilities: one-hot)."""
        drafts, self.guesses = {}, {}
        for s in reqs:
            if self._no_match.get(s.req_id) == len(s.prompt_token_ids) + len(s.output_token_ids):
                continue
            inflight = s.input_token_ids[-1] == PLACEHOLDER_TOKEN
            tokens = self._tokens(s)
            found = lookup(tokens, self.min_n, self.max_n, s.num_spec_slots + inflight).tolist()
            if not found:
                self._no_match[s.req_id] = len(tokens)
            elif inflight:
                self.guesses[s.req_id] = found.pop(0)
            if found:
                drafts[s.req_id] = (found, None)
        return drafts

    def _tokens(self, s: ScheduledRequest) -> np.ndarray:
        num_prompt = len(s.prompt_token_ids)
        total = num_prompt + len(s.output_token_ids)
        buf, n = self._history.get(s.req_id, (None, 0))
        if buf is None or n > total:  # new (or a history that shrank: start over)
            buf, n = np.empty(max(2 * total, 64), np.int32), 0
        if total > len(buf):
            buf = np.concatenate([buf[:n], np.empty(2 * total - n, np.int32)])
        if n < num_prompt:
            buf[n:num_prompt] = s.prompt_token_ids[n:]
            n = num_prompt
        buf[n:total] = s.output_token_ids[n - num_prompt:]
        self._history[s.req_id] = (buf, total)
        return buf[:total]
