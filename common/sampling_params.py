"""SamplingParams: how one request's tokens are chosen and when it stops.

Validated once in `__post_init__`; every error names the offending parameter so the API layer can
turn it into an OpenAI 400 and the CLI into a one-line message. Torch-free (the router builds these).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.common.errors import ParameterError
from pdserve.common.errors import check as _check
from pdserve.common.structured_outputs import StructuredOutputsParams

__all__ = ["ParameterError", "SamplingParams", "StructuredOutputsParams"]


INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # sequences per request (OpenAI's limit)
DEFAULT_MAX_LOGPROBS = 20  # --max-logprobs' default (vLLM's, OpenAI's top_logprobs limit); check_logprobs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens (vLLM's convention; kept for compatibility)
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top logprobs per output token (the chosen one is always given)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Which tokens may be sampled (vLLM's semantics; ids are checked against the vocabulary by the engine)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] = field(default_factory=list)  # never generated, alone or after a space
    structured_outputs: StructuredOutputsParams | None = None  # the output follows this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check(_finite(getattr(self, name)), name, f"{name} must be a finite number, got {getattr(self, name)!r}")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {self.n}")
        _check(0 <= self.temperature <= 2, "temperature", f"temperature must be in [0, 2], got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(_is_int(self.top_k) and -1 <= self.top_k <= INT32_MAX, "top_k",
               f"top_k must be -1 (disabled) or a positive integer, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX), "seed",
               f"seed must be an integer that fits in 64 bits, got {self.seed}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= UINT32_MAX),
               "max_tokens", f"max_tokens must be in [1, {UINT32_MAX}], got {self.max_tokens}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= UINT32_MAX, "min_tokens",
               f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        # the upper bound is the engine's --max-logprobs (check_logprobs)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= UINT32_MAX), "logprobs",
               f"logprobs must be >= 0, got {self.logprobs}")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= UINT32_MAX),
               "prompt_logprobs", f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               f"stop strings must be non-empty strings (an empty one matches at once), got {self.stop!r}")
        _check(all(_is_int(t) and 0 <= t <= UINT32_MAX for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be non-negative integers")
        if self.top_k == 0:
            self.top_k = -1
        self._check_token_constraints()

    def _check_token_constraints(self) -> None:
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", "logit_bias must map token ids to biases")
            _check(all(isinstance(t, int) and t >= 0 for t in self.logit_bias), "logit_bias",
                   "logit_bias keys must be non-negative token ids")
            _check(all(isinstance(v, (int, float)) and -100 <= v <= 100 for v in self.logit_bias.values()),
                   "logit_bias", "logit_bias values must be numbers in [-100, 100]")
            self.logit_bias = {t: float(v) for t, v in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            _check(len(self.allowed_token_ids) > 0 and all(isinstance(t, int) and t >= 0
                                                           for t in self.allowed_token_ids),
                   "allowed_token_ids", "allowed_token_ids must be a non-empty list of non-negative token ids")
        self.bad_words = list(self.bad_words or [])
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
               "bad_words must be non-empty strings")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "structured_outputs must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @property
    def needs_host_history(self) -> bool:
        """Sampling reads this request's latest tokens or reports per-token data on the host
        (penalties, min_tokens, logprobs): the engine then runs its steps one at a time. Token
        masks (grammars, bad_words) read the token in flight from the previous step instead."""
        return (self.has_penalties or self.min_tokens > 0 or self.logprobs is not None
                or self.prompt_logprobs is not None)

    @property
    def has_token_mask(self) -> bool:
        """Some tokens are forbidden at the next step (grammar, allowed_token_ids, bad_words)."""
        return self.structured_outputs is not None or self.allowed_token_ids is not None or bool(self.bad_words)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_logprobs(params: SamplingParams, max_logprobs: int, vocab_size: int | None = None) -> None:
    """The deployment's cap on logprobs per token (--max-logprobs, vLLM's; -1: the vocabulary)."""
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    if limit is None:
        return
    for name in ("logprobs", "prompt_logprobs"):
        asked = getattr(params, name)
        if asked is not None and asked > limit:
            raise ParameterError(name, f"Requested {name} of {asked}, which is greater than max allowed: {limit}"
                                       + (" (--max-logprobs)" if max_logprobs != -1 else " (the vocabulary)"))
