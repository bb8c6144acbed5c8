"""What leaves the engine, and the public, vLLM-shaped results of a request (torch-free).

    engine (serve, prefill, decode)         front end (serve's AsyncLLM / LLM, or the router)
    EngineOutput per sequence per step  --> RequestState (output_processor.py): detokenize, stop
      new token ids + their logprobs          strings, gather the n sequences --> RequestOutput
      (and across processes: the same deltas as proto messages, proto/convert.py)

`EngineOutput` is a *delta*: only the tokens new since the last one. `RequestOutput` is what
`LLM.generate` returns per prompt and what `EngineClient.generate` yields while a request runs; its
fields are cumulative (the whole text / token ids so far), built once, in the front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank of the token in the distribution
    decoded_token: str | None = None


# One entry per generated (or prompt) token: token id -> Logprob, holding the chosen token
# and the top-k alternatives.
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineOutput:
    """One sequence's news from one engine step (a delta; nothing is repeated)."""
    request_id: str  # the user's request
    index: int  # which of its n sequences
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token when logprobs were asked
    finish_reason: str | None = None  # common/request.py FINISH_REASONS; None while running
    stop_reason: int | str | None = None  # the stop token id (the engine never matches strings)
    error: str | None = None  # finish_reason "error": why
    # Reported with a sequence's first output:
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # index 0 only, when asked
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache or a KV load
    num_computed_prompt_tokens: int | None = None  # prompt tokens this engine ran through the model
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (or a KV handoff)
    num_computed_prompt_tokens: int = 0  # prompt tokens this engine ran through the model


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed inside the engine
    extra: dict = field(default_factory=dict)


def merge_step_outputs(earlier: list[EngineOutput], later: list[EngineOutput]) -> list[EngineOutput]:
    """One request's deltas of two consecutive steps as one list (one EngineOutput per sequence):
    a consumer that lags (AsyncLLM.stream) takes every step queued meanwhile as one item, so a
    stream message / SSE event carries several tokens instead of one each (vLLM's output
    coalescing). Tokens and logprobs are concatenated; what is reported once (prompt logprobs,
    cached/computed prompt tokens, first scheduled time) comes from the earlier delta; the
    finish, stop reason and error from the later. Neither list is modified."""
    merged = {o.index: o for o in earlier}
    for b in later:
        a = merged.get(b.index)
        if a is None:
            merged[b.index] = b
            continue
        logprobs = None
        if a.new_logprobs is not None or b.new_logprobs is not None:
            logprobs = (a.new_logprobs or []) + (b.new_logprobs or [])
        merged[b.index] = EngineOutput(
            request_id=a.request_id, index=a.index, new_token_ids=a.new_token_ids + b.new_token_ids,
            new_logprobs=logprobs, finish_reason=b.finish_reason or a.finish_reason,
            stop_reason=b.stop_reason if b.finish_reason else a.stop_reason, error=b.error or a.error,
            prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
            num_cached_tokens=_first_given(a.num_cached_tokens, b.num_cached_tokens),
            num_computed_prompt_tokens=_first_given(a.num_computed_prompt_tokens, b.num_computed_prompt_tokens),
            first_scheduled_time=_first_given(a.first_scheduled_time, b.first_scheduled_time))
    return sorted(merged.values(), key=lambda o: o.index)


def _first_given(a, b):
    return a if a is not None else b
