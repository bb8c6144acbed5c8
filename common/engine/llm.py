"""LLM: the offline batch API, shaped like vLLM's.

    llm = LLM(model="path/to/hf-folder-or.gguf")          # no model: the packaged SmolLM2
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason
    llm.chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import itertools
from typing import Sequence

from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.outputs import RequestOutput
from pdserve.common.sampling_params import ParameterError, SamplingParams

PromptType = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 block_size: int = 16, num_gpu_blocks_override: int | None = None, kv_cache_memory_gb: float = 2.0,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, seed: int = 0,
                 tokenizer: str | None = None, load_format: str = "auto", device: str = "cpu",
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 served_model_name: str | None = None, async_scheduling: bool | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto", kv_cache_scale: str = "per-head"):
        config = EngineConfig(
            model=ModelConfig(model=model or "default", dtype=dtype, max_model_len=max_model_len, seed=seed,
                              tokenizer=tokenizer, load_format=load_format, device=device,
                              served_model_name=served_model_name, quantization=quantization),
            cache=CacheConfig(block_size=block_size, num_blocks=num_gpu_blocks_override,
                              kv_cache_memory_gb=kv_cache_memory_gb, enable_prefix_caching=enable_prefix_caching,
                              gpu_memory_utilization=gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype,
                              kv_cache_scale=kv_cache_scale),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      max_model_len=max_model_len or max_num_batched_tokens),
            enforce_eager=enforce_eager, async_scheduling=async_scheduling)
        self.engine = EngineCore(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string, a list of token ids or
        {"prompt": str} / {"prompt_token_ids": [...]}. Every prompt is validated before any runs."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
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
            self.engine.add_request(rid, ids, p, prompt=text)
            order.append(rid)
        return self._run(order, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt": self.engine.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                    "add_special_tokens": False} for c in conversations]
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
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(order), desc="Processed prompts", unit="req", dynamic_ncols=True)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[rid] for rid in order]
