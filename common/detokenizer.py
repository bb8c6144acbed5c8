"""Incremental detokenization with stop strings (torch-free: decode workers and the router use it).

Each new token decodes a short window: text(ids[prefix:]) minus text(ids[prefix:read]). The
window keeps a few tokens of left context so word-initial spaces come out right, and a result
ending in U+FFFD (half of a multi-byte UTF-8 character, e.g. an emoji split over byte tokens)
is held back until the next token completes it.

Stop strings may span tokens: the search covers the new text plus the tail that could hold the
start of a stop string. While running, the last `max_stop_len - 1` characters are held back from
`visible_text` so a client never sees the beginning of a stop string that later matches.
"""

from __future__ import annotations

from pdserve.common.engine_client import TokenizerLike

INITIAL_CONTEXT = 5  # prompt tokens used as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerLike, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True,
                 min_tokens: int = 0):
        """`min_tokens`: stop strings are looked for only in the text of tokens after the first
        min_tokens (vLLM's rule, as for stop token ids and EOS)."""
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-INITIAL_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.text = ""
        self.num_output_tokens = 0
        self.min_tokens = min_tokens
        self.stop_buffer = max((len(s) for s in stop), default=1) - 1 if not include_stop_str_in_output else 0

    def add_tokens(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string if one matched (text is then cut at it)."""
        for token in new_token_ids:
            self.token_ids.append(token)
            self.num_output_tokens += 1
            before = len(self.text)
            prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset],
                                                skip_special_tokens=self.skip_special)
            full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:],
                                              skip_special_tokens=self.skip_special)
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                self.text += full_text[len(prefix_text):]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
            if self.stop and len(self.text) > before and self.num_output_tokens > self.min_tokens:
                matched = self._find_stop(before)
                if matched is not None:
                    return matched
        return None

    def _find_stop(self, new_start: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            idx = self.text.find(stop, max(new_start - len(stop) + 1, 0))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def visible_text(self, finished: bool) -> str:
        if finished or not self.stop_buffer:
            return self.text
        return self.text[:max(len(self.text) - self.stop_buffer, 0)]
