"""EngineCore: the step loop shared by `LLM`, `pdserve serve` and the prefill/decode services.

    step():  sched = scheduler.schedule()          # which tokens run now
             result = runner.execute(sched)        # one forward pass + sampling
             touched = scheduler.update(sched, result)
             return outputs.process(touched)       # detokenize, stop strings, RequestOutputs

Overlapped (async scheduling, the default on CUDA): the host work of a step hides behind the
device work of the previous one, so the GPU never waits for Python between steps:

    step k:  sched_k = schedule()                  # step k-1 still running on the device
             pending_k = runner.launch(sched_k)    # queued behind k-1; inputs sampled by k-1
                                                   #   are filled on the device
             result = pending_{k-1}.result()       # waits for k-1's tokens only
             update(sched_{k-1}, result); return outputs.process(...)

Steps run one at a time while any request needs its latest tokens on the host to sample
(penalties, min_tokens, logprobs; `SamplingParams.needs_host_history`).

A failing forward pass fails the requests in that step with an error and the engine goes on,
unless the runner raises EngineDeadError (a tensor-parallel rank died): that ends the engine.

Tensor parallel (`--tensor-parallel-size N`): the runner is rank 0's (`tp_workers.py`), which
sends each step to ranks 1..N-1 in their own processes; the scheduler and KV manager run here once.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pdserve.common.config import ConfigError, EngineConfig
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.model_runner import ModelRunner, PendingOutput
from pdserve.common.engine.outputs import SchedulerOutput
from pdserve.common.engine.output_processor import OutputProcessor, ParentRequest
from pdserve.common.engine.scheduler import Scheduler
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.models.loader import read_arch_config, resolve_model_path
from pdserve.common.outputs import RequestOutput
from pdserve.common.request import Request, RequestStatus
from pdserve.common.sampling_params import ParameterError, SamplingParams
from pdserve.common.tokenizer import load_tokenizer

log = logging.getLogger("pdserve.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, load_tokenizer_: bool = True):
        self.config = config
        self.model_path = resolve_model_path(config.model.model)
        self.arch = read_arch_config(self.model_path)
        max_len = config.model.max_model_len or self.arch.max_position_embeddings
        if max_len > self.arch.max_position_embeddings:
            raise ConfigError(f"--max-model-len {max_len} exceeds the model's context length "
                              f"{self.arch.max_position_embeddings}")
        self.max_model_len = max_len
        self.tokenizer = load_tokenizer(self.model_path, config.model.tokenizer) if load_tokenizer_ else None
        eos = list(self.arch.eos_token_ids) + (self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        sched_cfg = dataclasses.replace(config.scheduler, max_model_len=max_len)
        self.tensor_parallel_size = config.parallel.tensor_parallel_size
        if self.tensor_parallel_size > 1:
            config.parallel.check_model(self.arch)
            from pdserve.common.engine.tp_workers import start_tensor_parallel
            self.runner = start_tensor_parallel(config, self.arch, self.model_path, max_len, sched_cfg)
        else:
            self.runner = ModelRunner(config.model, config.cache, self.arch, self.model_path, max_len,
                                      scheduler_cfg=sched_cfg, enforce_eager=config.enforce_eager)
        capacity = self.runner.num_blocks * config.cache.block_size
        if capacity < max_len:
            raise ConfigError(f"the KV cache holds {capacity} tokens, fewer than --max-model-len {max_len}: "
                              "lower --max-model-len or give the cache more memory")
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        self.outputs = OutputProcessor(self.tokenizer)
        self.model_name = config.model.served_model_name or config.model.model or "default"
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        overlap = config.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if overlap is None else overlap
        self._inflight: tuple[SchedulerOutput, PendingOutput] | None = None
        self.num_overlapped_steps = 0  # steps launched while the previous one was still running

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ParameterError("prompt", "the prompt is empty: give at least one token")
        if len(prompt_token_ids) > self.max_model_len:
            raise ParameterError("prompt", f"this model's maximum context length is {self.max_model_len} tokens, "
                                           f"but the prompt has {len(prompt_token_ids)} tokens")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ParameterError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ParameterError("stop_token_ids", f"stop_token_ids must be below the vocabulary size {vocab}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival_time: float | None = None,
                    output_token_ids: list[list[int]] | None = None) -> None:
        """Queue a request. `output_token_ids` (one list per sequence) continues a request that
        already produced tokens elsewhere (resubmission after a decode worker died)."""
        self.validate(prompt_token_ids, params)
        if request_id in self.outputs.parents:
            raise ParameterError("request_id", f"request id {request_id!r} is already running")
        arrival = arrival_time or time.time()
        parent = ParentRequest(request_id, prompt, list(prompt_token_ids), params, arrival)
        for i in range(params.n):
            child_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            done = output_token_ids[i] if output_token_ids else None
            parent.children.append(Request(child_id, prompt_token_ids, child_params, self.eos_token_ids,
                                           arrival, output_token_ids=done))
        self.outputs.add(parent)
        for child in parent.children:
            self.scheduler.add_request(child)
        self.num_prompt_tokens += len(prompt_token_ids)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        child_ids = []
        for rid in request_ids:
            parent = self.outputs.parents.get(rid)
            if parent is not None:
                child_ids += [c.request_id for c in parent.children]
        reqs = self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        return self.outputs.process(reqs, self.scheduler.finish_requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        overlap = self.async_scheduling and self.scheduler.num_host_history_requests == 0
        if not overlap and self._inflight is not None:
            return self._complete(*self._take_inflight())  # drain before stepping one at a time
        sched = self.scheduler.schedule()
        failed, launched = [], None
        if not sched.is_empty():
            try:
                launched = (sched, self.runner.launch(sched))
                self.num_overlapped_steps += self._inflight is not None
            except EngineDeadError:
                raise
            except Exception as e:  # fail this step's requests, keep serving the rest
                failed = self._fail(sched, e)
        if not overlap:
            return self._complete(*launched) if launched else failed
        outputs = self._complete(*self._take_inflight()) if self._inflight is not None else []
        self._inflight = launched
        return failed + outputs

    def _take_inflight(self) -> tuple[SchedulerOutput, PendingOutput]:
        inflight, self._inflight = self._inflight, None
        return inflight

    def _complete(self, sched: SchedulerOutput, pending: PendingOutput) -> list[RequestOutput]:
        try:
            result = pending.result()
        except EngineDeadError:
            raise
        except Exception as e:
            return self._fail(sched, e)
        self.num_steps += 1
        touched = self.scheduler.update(sched, result)
        self.num_generated_tokens += len(touched)  # one token each (an overlapped step's extra one is dropped)
        return self.outputs.process(touched, self.scheduler.finish_requests)

    def _fail(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        log.error("forward pass failed", exc_info=error)
        ids = [s.req_id for s in sched.scheduled if s.req_id in self.scheduler.requests]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        return self.outputs.fail(ids, f"internal error in the forward pass: {error}")

    def check_alive(self) -> None:
        """Raises EngineDeadError if the engine cannot go on (a tensor-parallel rank died)."""
        self.runner.check_alive()

    def shutdown(self) -> None:
        self.runner.shutdown()

    def stats(self) -> dict:
        return {"num_running": self.scheduler.num_running(), "num_waiting": self.scheduler.num_waiting(),
                "tensor_parallel_size": self.tensor_parallel_size,
                # KV blocks each rank's memory could hold; every rank holds num_blocks (their min)
                "kv_blocks_fit_by_rank": list(self.runner.num_blocks_by_rank),
                "kv_usage": self.kv.usage(), "num_free_blocks": self.kv.num_free_blocks,
                "num_blocks": self.runner.num_blocks, "num_preemptions": self.scheduler.num_preemptions,
                "prefix_queries": self.kv.num_prefix_queries, "prefix_hits": self.kv.num_prefix_hits,
                "num_steps": self.num_steps, "num_generated_tokens": self.num_generated_tokens}
