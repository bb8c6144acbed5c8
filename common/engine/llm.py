"""LLM: the offline batch API, shaped like vLLM's.

    llm = LLM(model="path/to/hf-folder-or.gguf")          # no model: the packaged SmolLM2
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason
    llm.chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from pdserve.common.config import EngineConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.output_processor import OutputProcessor
from pdserve.common.outputs import RequestOutput
from pdserve.common.sampling_params import ParameterError, SamplingParams

PromptType = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **options):
        """`options` are the engine options by keyword, as the CLI flags spell them with
        underscores (common/config.py: dtype, max_model_len, max_num_seqs, num_gpu_blocks_override,
        device, enforce_eager, ...); an unknown one is a ConfigError."""
        self._start(EngineConfig.from_options(model=model, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        # offline: nobody waits for a first token, so on CPU the larger default step (config.py)
        self.engine = EngineCore(dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                                          offline=True)))
        self.outputs = OutputProcessor(self.engine.tokenizer)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Release the engine's device memory (KV cache, graphs, weights) and stop tensor-parallel
        worker processes now (they also stop when this process exits). The LLM is unusable after."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation-config defaults (--generation-config), as
        vLLM's: what `generate` and `chat` use when given no sampling parameters."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string, a list of token ids or
        {"prompt": str} / {"prompt_token_ids": [...]}. Every prompt is validated before any runs."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ParameterError("sampling_params", f"{len(params_list)} sampling params for {len(prompts)} prompts")
        requests = []
        for prompt, p in zip(prompts, params_list):
            text, ids = self._tokenize(prompt)
            self.engine.validate(ids, p)
            requests.append((text, ids, p))
        order = []
        for text, ids, p in requests:
            rid = str(next(self._ids))
            self.add_request(rid, ids, p, prompt=text)
            order.append(rid)
        return self._run(order, use_tqdm)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue one request; `step()` advances every queued request (vLLM's LLMEngine shape)."""
        self.engine.validate(prompt_token_ids, params)
        if request_id in self.outputs.states:
            raise ParameterError("request_id", f"request id {request_id!r} is already running")
        state = self.outputs.add(request_id, prompt, prompt_token_ids, params)
        self.engine.add_request(request_id, prompt_token_ids, params, arrival_time=state.metrics.arrival_time)

    def step(self) -> list[RequestOutput]:
        """One engine step: the RequestOutput of every request it changed."""
        outs, stopped = self.outputs.process(self.engine.step())
        if stopped:
            self.engine.stop_sequences(stopped)
        return outs

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outs, _ = self.outputs.process(self.engine.abort(request_ids))
        return outs

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation or a list of them through the model's chat template
        (`chat_template`: another one's text for these calls; `chat_template_kwargs`: extra template
        variables, over the arguments above as vLLM merges them; `tools`: the template's tools)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        if chat_template is not None:
            tokenizer = tokenizer.with_chat_template(chat_template)
        args = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                "tools": tools, **(chat_template_kwargs or {})}
        prompts = [{"prompt": tokenizer.apply_chat_template(c, **args), "add_special_tokens": False}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.engine.tokenizer.encode(
                prompt["prompt"], add_special_tokens=prompt.get("add_special_tokens", True))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ParameterError("prompt", f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request of `order` finished. Interrupted (Ctrl-C in a notebook, any
        exception), its unfinished requests are aborted first, so the next call starts clean
        instead of inheriting them and a step cut short."""
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(order), desc="Processed prompts", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished():
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.abort([rid for rid in order if rid not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in order]
