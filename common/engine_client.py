"""The contract between the OpenAI front end and whatever generates tokens (torch-free).

`pdserve serve` implements it with the in-process async engine; the disaggregated router
implements it with gRPC calls to prefill and decode services. The front end (services/router/app.py)
only ever talks to this protocol, so both deployments expose the same API.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from pdserve.common.outputs import RequestOutput
from pdserve.common.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The generating side is gone; the request failed fast rather than hang."""


class TokenizerLike(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str: ...


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: TokenizerLike

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs as tokens arrive; the last has finished=True.
        Raises ParameterError for bad input (e.g. prompt too long) before yielding anything."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def is_healthy(self) -> bool: ...
