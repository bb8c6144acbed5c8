"""Public, vLLM-shaped results of a request (torch-free: the router builds them too).

`RequestOutput` is what `LLM.generate` returns per prompt and what the async engine yields while a
request runs. Fields are cumulative: each yield carries the whole text / token ids so far, so a
streaming consumer sends `text[len(previous_text):]` (see `CompletionOutput.delta_since`).
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
