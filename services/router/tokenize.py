"""vLLM's /tokenize and /detokenize (torch-free), on `pdserve serve` and the router alike.

    POST /tokenize    {"prompt": str, "add_special_tokens": true}
                   or {"messages": [...], "add_generation_prompt": true, "continue_final_message", "tools",
                          "chat_template_kwargs"}
                      -> {"count", "max_model_len", "tokens", "token_strs" (with return_token_strs)}
    POST /detokenize  {"tokens": [ids]} -> {"prompt": str}

Like vLLM's they sit outside /v1 and so outside --api-key. Messages are rendered exactly as
/v1/chat/completions renders them (OpenAIServer.render_chat), so the count is the prompt's.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pdserve.common.sampling_params import ParameterError
from pdserve.services.router import openai_schema as oa


class TokenizeRequest(oa._Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[oa.ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None  # refused, as on chat completions
    tools: list[oa.ChatTool] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(oa._Request):
    model: str | None = None
    tokens: list[oa.TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(server, req: TokenizeRequest) -> TokenizeResponse:
    """`server`: the app's OpenAIServer (tokenizer, model check, chat rendering)."""
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ParameterError("prompt", "give either prompt or messages")
    if req.messages is not None:
        text = server.render_chat([m.to_template(i) for i, m in enumerate(req.messages)], req.tools,
                                  req.add_generation_prompt, req.chat_template_kwargs,
                                  continue_final_message=req.continue_final_message, chat_template=req.chat_template)
        special = bool(req.add_special_tokens)
    else:
        text, special = req.prompt, req.add_special_tokens is not False
    ids = await server._encode(text, special, "messages" if req.messages is not None else "prompt")
    strs = server.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=server.engine.max_model_len, tokens=ids, token_strs=strs)


def detokenize(server, req: DetokenizeRequest) -> DetokenizeResponse:
    server.check_model(req.model)
    vocab = getattr(server.tokenizer, "vocab_size", None)
    bad = next((t for t in req.tokens if vocab is not None and t >= vocab), None)
    if bad is not None:
        raise ParameterError("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
    return DetokenizeResponse(prompt=server.tokenizer.decode(req.tokens, skip_special_tokens=False))
