"""EngineCore: the step loop shared by `LLM`, `pdserve serve` and the prefill/decode services.

    step():  sched = scheduler.schedule()          # which tokens run now
             result = runner.execute(sched)        # one forward pass + sampling
             touched = scheduler.update(sched, result)
             return deltas(touched)                # EngineOutput per sequence: new ids, finish

The engine emits token ids only: detokenization and stop strings belong to the front end that
talks to the client (common/output_processor.py), which calls `stop_sequences` on a stop-string
match. A user request with n > 1 becomes n sequences here (`add_request`, the one fan-out).

Overlapped (async scheduling, the default on CUDA): the host work of a step hides behind the
device work of the previous one, so the GPU never waits for Python between steps:

    step k:  sched_k = schedule()                  # step k-1 still running on the device
             pending_k = runner.launch(sched_k)    # queued behind k-1; inputs sampled by k-1
                                                   #   are filled on the device
             result = pending_{k-1}.result()       # waits for k-1's tokens only
             update(sched_{k-1}, result); return deltas(...)

Steps run one at a time while any request needs its latest tokens on the host to sample
(penalties, min_tokens, logprobs; `SamplingParams.needs_host_history`). With speculative
decoding a step's drafts are proposed from the tokens of the step before, so the overlap is
another (`_step_speculative`, spec_decode/pipeline.py): result(k-1), update, launch(k), and only
then the deltas of k-1; a step that drafted nothing lets the next one launch first (which may
verify drafts proposed past its input token in flight).

Constrained decoding (grammars, allowed_token_ids, bad_words) enters through one object,
`self.structured` (common/engine/structured_output.py): it compiles grammars at validation,
fills each step's token bitmask for the runner (overlapped steps included: a grammar row's token
in flight is read from the previous step), and after update() says which requests' grammars ended.

A failing forward pass fails the requests in that step with an error and the engine goes on,
unless the runner raises EngineDeadError (a tensor-parallel rank died): that ends the engine.

Tensor parallel (`--tensor-parallel-size N`): the runner is rank 0's (`tp_workers.py`), which
sends each step to ranks 1..N-1 in their own processes; the scheduler and KV manager run here once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Collection

from pdserve.common.config import ConfigError, EngineConfig
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.model_runner import ModelRunner, PendingOutput, model_dtype, resolve_device
from pdserve.common.engine.kv_connector import KVConnector
from pdserve.common.engine.outputs import SchedulerOutput
from pdserve.common.engine.scheduler import Scheduler
from pdserve.common.engine.spec_decode.pipeline import can_overlap_next, guess_hits, overlaps
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.engine.structured_output import StructuredOutputManager
from pdserve.common.model_path import served_name
from pdserve.common.models.loader import read_arch_config, resolve_model_path
from pdserve.common.outputs import EngineOutput, Logprob, TokenLogprobs
from pdserve.common.request import Request, RequestStatus, child_request_id, sequence_seed
from pdserve.common.sampling_params import ParameterError, SamplingParams, check_logprobs
from pdserve.common.stats import EngineStats, SpecDecodeStats
from pdserve.common.tokenizer import load_tokenizer

log = logging.getLogger("pdserve.engine")

# The CPU KV pool's background population (cpu_ops.populate_in_background) runs only once no step
# has run for this long: on two cores even a nice-19 thread stalls a step's OpenMP team
POPULATE_IDLE_S = 0.25


class EngineCore:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None,
                 wake: Callable[[], None] = lambda: None, load_tokenizer_: bool = True):
        self.config = config
        self.model_path = resolve_model_path(config.model.model)
        from pdserve.common.generation_config import sampling_defaults
        # the model's default sampling parameters (--generation-config): the API's and LLM's
        self.sampling_defaults = sampling_defaults(self.model_path, config.model.generation_config)
        self.arch = read_arch_config(self.model_path)
        max_len = config.model.max_model_len or self.arch.max_position_embeddings
        if max_len > self.arch.max_position_embeddings:
            raise ConfigError(f"--max-model-len {max_len} exceeds the model's context length "
                              f"{self.arch.max_position_embeddings}")
        self.max_model_len = max_len
        self.tokenizer = (load_tokenizer(self.model_path, config.model.tokenizer, config.model.chat_template)
                          if load_tokenizer_ else None)
        if config.model.trust_remote_code:
            log.info("--trust-remote-code has no effect: pdserve runs no code from a checkpoint, downloads nothing")
        eos = list(self.arch.eos_token_ids) + (self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        device = resolve_device(config.model.device)
        sched_cfg = dataclasses.replace(config.scheduler, max_model_len=max_len, on_cpu=device.type == "cpu",
                                        half_precision=model_dtype(config.model.dtype, self.model_path,
                                                                   device).itemsize < 4)
        self.tensor_parallel_size = config.parallel.tensor_parallel_size
        spec = config.speculative_config
        if self.tensor_parallel_size > 1:
            config.parallel.check_model(self.arch)
            from pdserve.common.engine.tp_workers import start_tensor_parallel
            self.runner = start_tensor_parallel(config, self.arch, self.model_path, max_len, sched_cfg)
        else:
            self.runner = ModelRunner(config.model, config.cache, self.arch, self.model_path, max_len,
                                      scheduler_cfg=sched_cfg, enforce_eager=config.enforce_eager, speculative=spec)
        capacity = self.runner.num_blocks * config.cache.block_size
        if capacity < max_len:
            raise ConfigError(f"the KV cache holds {capacity} tokens, fewer than --max-model-len {max_len}: "
                              "lower --max-model-len or give the cache more memory")
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self._last_step_at = 0.0  # time.monotonic() of the last step (_idle_frontier)
        self.runner.kv_frontier = self._idle_frontier  # the CPU pool's pages follow it while idle (ModelRunner)
        self.connector = connector
        if connector is not None:
            connector.bind(self.kv, wake)
        self.scheduler = Scheduler(sched_cfg, self.kv, connector,
                                   num_speculative_tokens=spec.num_speculative_tokens if spec else 0)
        runner_spec = getattr(self.runner, "spec", None)
        self.scheduler.rounds_per_step = runner_spec.rounds_per_step if runner_spec is not None else 0
        self.spec_stats = SpecDecodeStats.new(spec.num_speculative_tokens) if spec else None
        self._unrecorded: list = []  # (RunnerOutput, touched requests) of applied steps, for spec_stats
        self.requests: dict[str, list[Request]] = {}  # user request id -> its sequences
        self.model_name = config.model.served_model_name or served_name(config.model.model)
        self.structured = StructuredOutputManager(self.tokenizer, self.arch.vocab_size, self.eos_token_ids,
                                                  device=self.runner.device)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        overlap = config.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if overlap is None else overlap
        self._inflight: tuple[SchedulerOutput, PendingOutput] | None = None
        self._spec_overlap_next = False  # speculation: the step in flight lets the next launch first
        self.num_overlapped_steps = 0  # steps launched while the previous one was still running
        self.wait_seconds = 0.0  # host time blocked on the device for steps' results (bench spec: the split)
        self.launch_seconds = 0.0  # speculative steps: host time scheduling, proposing and launching (ditto)
        self._progress = True  # the last step launched or completed something (see `stalled`)

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own last guard (the edge that received the request checked it first)."""
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
        check_logprobs(params, self.config.model.max_logprobs, vocab)
        self.structured.validate(params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, output_token_ids: list[list[int]] | None = None,
                    kv_transfer: object | None = None, finished_indices: Collection[int] = ()) -> None:
        """Queue a user request as its n sequences. `output_token_ids` (one list per sequence)
        continues sequences that already produced tokens elsewhere (a prefill worker's first token,
        or a resubmission after a decode worker died), except those in `finished_indices`, which
        ended there; `kv_transfer` is for the KV connector (given to the first sequence)."""
        self.validate(prompt_token_ids, params)
        if request_id in self.requests:
            raise ParameterError("request_id", f"request id {request_id!r} is already running")
        if output_token_ids is not None and len(output_token_ids) != params.n:
            raise ParameterError("output_token_ids", f"{len(output_token_ids)} sequences given for n={params.n}")
        arrival = arrival_time or time.time()
        live = [i for i in range(params.n) if i not in finished_indices]
        if not live:
            raise ParameterError("sequences", "every sequence of the request has already finished")
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=sequence_seed(params.seed, i))
            children.append(Request(child_request_id(request_id, i, params.n), prompt_token_ids, child_params,
                                    self.eos_token_ids, arrival, output_token_ids=output_token_ids[i]
                                    if output_token_ids else None, parent_id=request_id, index=i,
                                    kv_transfer=kv_transfer if i == live[0] else None))
        self.requests[request_id] = children
        for child in children:
            if child.index in finished_indices:
                child.status = RequestStatus.FINISHED_STOPPED  # never scheduled, never reported
            else:
                self.scheduler.add_request(child)
        self.num_prompt_tokens += len(prompt_token_ids)

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        """Finish these user requests; their unfinished sequences report finish_reason "abort"."""
        reqs = [c for rid in request_ids for c in self.requests.get(rid, ())]
        done = self.scheduler.finish_requests([c.request_id for c in reqs if not c.is_finished()],
                                              RequestStatus.FINISHED_ABORTED)
        return self._outputs(done)

    def stop_sequences(self, sequences: list[tuple[str, int]]) -> None:
        """A front end matched a stop string: finish these (request id, index) sequences. The
        front end already reported them finished, so nothing more is emitted for them."""
        ids = [child_request_id(rid, i, len(self.requests[rid])) for rid, i in sequences if rid in self.requests]
        for req in self.scheduler.finish_requests(ids, RequestStatus.FINISHED_STOPPED):
            self._forget(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def housekeeping(self) -> None:
        """Between steps and while idle: the connector's timers (lease expiry)."""
        if self.connector is not None:
            self.connector.on_step()

    def _idle_frontier(self) -> int | None:
        """Blocks handed out so far, or None while a step ran within POPULATE_IDLE_S (the KV pool's
        background population waits for an idle engine: cpu_ops.populate_in_background)."""
        if time.monotonic() - self._last_step_at < POPULATE_IDLE_S:
            return None
        return self.kv.num_blocks_handed_out()

    def has_work(self) -> bool:
        """A step can make progress now (not only KV loads in flight elsewhere)."""
        return self.scheduler.has_schedulable() or self._inflight is not None

    # ---- the step ---------------------------------------------------------------------------
    @property
    def stalled(self) -> bool:
        """The last step neither launched nor completed anything and nothing is in flight: every
        waiting request needs blocks that are held (by running requests' successors, by leases
        that decode has not pulled yet). The scheduler is deterministic, so stepping again gives
        the same nothing until something outside the step frees blocks: a lease released or
        expired, a request added or aborted, a KV load finished. The engine loop waits for
        those instead of spinning (a spinning engine thread starved a prefill worker's event
        loop, the one that serves the pulls that would free the blocks)."""
        return not self._progress and self._inflight is None

    def step(self) -> list[EngineOutput]:
        self._last_step_at = time.monotonic()
        self._progress = False
        overlap = self.async_scheduling and self.scheduler.num_host_history_requests == 0
        if self.spec_stats is not None and self.async_scheduling:
            # tensor parallelism: the followers' drafts come with each step, never past a token in flight
            if self.tensor_parallel_size == 1:
                return self._step_speculative()
            overlap = False  # one step at a time, the deltas too (spec_decode/pipeline.py)
        if not overlap and self._inflight is not None:
            return self._complete(*self._take_inflight())  # drain before stepping one at a time
        launched, failed = self._launch()
        if not overlap:
            return self._complete(*launched) if launched else failed
        outputs = self._complete(*self._take_inflight()) if self._inflight is not None else []
        self._inflight = launched
        return failed + outputs

    def _launch(self) -> tuple[tuple[SchedulerOutput, PendingOutput] | None, list[EngineOutput]]:
        """Schedule and launch a step: ((sched, pending) or None when nothing runs, failed outputs)."""
        sched = self.scheduler.schedule()
        self.structured.drop(sched.finished_req_ids)
        if sched.is_empty():
            return None, []
        self._progress = True
        try:
            launched = (sched, self.runner.launch(sched, self.structured))
        except EngineDeadError:
            raise
        except Exception as e:  # fail this step's requests, keep serving the rest
            return None, self._fail(sched, e)
        self.num_overlapped_steps += self._inflight is not None
        return launched, []

    def _step_speculative(self) -> list[EngineOutput]:
        """Speculative steps: the next one launches once the previous result is applied, before its
        deltas go out; below OVERLAP_MAX_BATCH running requests it may launch before that result
        (spec_decode/pipeline.py tells the order)."""
        inflight, self._inflight = self._inflight, None
        launch_first = inflight is not None and self._spec_overlap_next and not self.scheduler.num_host_history_requests
        touched, outputs = self._apply(*inflight) if inflight is not None and not launch_first else ([], [])
        if launch_first:
            self._inflight = inflight  # counted as overlapped in _launch
        t0 = time.perf_counter()
        launched, failed = self._launch()
        self.launch_seconds += time.perf_counter() - t0
        if launch_first:
            touched, outputs = self._apply(*inflight)
        self._spec_overlap_next = (launched is not None and overlaps(self.scheduler.num_running())
                                   and can_overlap_next(self.runner.spec, self.scheduler.requests))
        self._inflight = launched
        return failed + outputs + self._emit(touched)

    def _take_inflight(self) -> tuple[SchedulerOutput, PendingOutput]:
        inflight, self._inflight = self._inflight, None
        return inflight

    def _complete(self, sched: SchedulerOutput, pending: PendingOutput) -> list[EngineOutput]:
        touched, failed = self._apply(sched, pending)
        return failed + self._emit(touched)

    def _apply(self, sched: SchedulerOutput, pending: PendingOutput) -> tuple[list[Request], list[EngineOutput]]:
        """A launched step's results into the scheduler: (touched requests, outputs of a failed step)."""
        self._progress = True
        try:
            t0 = time.perf_counter()
            result = pending.result()
            self.wait_seconds += time.perf_counter() - t0
        except EngineDeadError:
            raise
        except Exception as e:
            return [], self._fail(sched, e)
        self.num_steps += 1
        touched = self.scheduler.update(sched, result)
        if self.spec_stats is not None:  # counted in _emit: after the next launch
            self._unrecorded.append((result, touched))
        ended, broken = self.structured.update(touched)
        self.scheduler.finish_requests(ended, RequestStatus.FINISHED_STOPPED)  # reported through touched
        self.scheduler.finish_requests(broken, RequestStatus.FINISHED_ERROR)
        return touched, []

    def _emit(self, touched: list[Request]) -> list[EngineOutput]:
        for result, reqs in self._unrecorded:
            self.spec_stats.record(result.spec_token_ids, result.num_accepted_tokens, guess_hits(result, reqs),
                                   result.spec_rounds)
        self._unrecorded.clear()
        outputs = self._outputs(touched)  # an overlapped step's extra token was dropped in update()
        self.num_generated_tokens += sum(len(o.new_token_ids) for o in outputs)
        return outputs

    def _fail(self, sched: SchedulerOutput, error: Exception) -> list[EngineOutput]:
        log.error("forward pass failed", exc_info=error)
        ids = [s.req_id for s in sched.scheduled if s.req_id in self.scheduler.requests]
        failed = self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        return self._outputs(failed, error=f"internal error in the forward pass: {error}")

    def check_alive(self) -> None:
        """Raises EngineDeadError if the engine cannot go on (a tensor-parallel rank died)."""
        self.runner.check_alive()

    def shutdown(self) -> None:
        self.runner.shutdown()

    # ---- outputs ----------------------------------------------------------------------------
    def _outputs(self, reqs: list[Request], error: str | None = None) -> list[EngineOutput]:
        """One delta per touched sequence: its new tokens and logprobs, and how it finished."""
        outs = []
        for req in reqs:
            new = req.output_token_ids[req.num_sent_tokens:]
            req.num_sent_tokens += len(new)
            finished = req.status.is_finished()
            out = EngineOutput(req.parent_id, req.index, new)
            if finished:
                out.finish_reason, out.stop_reason, out.error = req.finish_reason(), req.stop_reason, error
            if req.params.logprobs is not None:
                out.new_logprobs = [_logprob_dict(top) for _, top in req.logprobs[req.num_sent_logprobs:]]
                req.num_sent_logprobs = len(req.logprobs)
            if not req.reported and (new or finished):
                req.reported = True
                out.num_cached_tokens = req.num_cached_tokens or 0
                out.num_computed_prompt_tokens = req.num_computed_prompt_tokens
                out.first_scheduled_time = req.first_scheduled_time
                if req.index == 0 and req.params.prompt_logprobs is not None:
                    out.prompt_logprobs = [None if e is None else _logprob_dict(e) for e in req.prompt_logprobs]
            if finished:
                self._forget(req)
            outs.append(out)
        return outs

    def _forget(self, req: Request) -> None:
        children = self.requests.get(req.parent_id)
        if children is not None and all(c.is_finished() for c in children):
            del self.requests[req.parent_id]

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(num_running=self.scheduler.num_running(), num_waiting=self.scheduler.num_waiting(),
                           kv_usage=kv.usage(), num_free_blocks=kv.num_free_blocks, num_blocks=self.runner.num_blocks,
                           num_cached_blocks=len(kv.pool.cached), num_preemptions=self.scheduler.num_preemptions,
                           prefix_queries=kv.num_prefix_queries, prefix_hits=kv.num_prefix_hits,
                           num_steps=self.num_steps, num_prompt_tokens=self.num_prompt_tokens,
                           num_generated_tokens=self.num_generated_tokens,
                           tensor_parallel_size=self.tensor_parallel_size,
                           kv_blocks_fit_by_rank=list(self.runner.num_blocks_by_rank),
                           spec_decode=None if self.spec_stats is None else self.spec_stats.snapshot())


def _logprob_dict(top: dict[int, tuple[float, int]]) -> TokenLogprobs:
    return {t: Logprob(lp, rank) for t, (lp, rank) in top.items()}
