"""DisaggClient: the EngineClient of `pdserve router` — one request over prefill and decode services.

    generate():  route = pool.route(prompt)  (prefix hits vs load, routing.py; one Redis call)
                 route.prefill --gRPC Prefill--> first token(s) + KV handle
                 yield the first token at once (TTFT is the prefill's latency)
                 route.decode --gRPC Decode (stream) + handle--> token deltas
                 detokenize here (the router owns the tokenizer), yield cumulative RequestOutputs
                 route.prefill None (short or decode-cached prompt): Decode without a handle,
                 decode computes the prompt itself (conditional disaggregation)

Counters (`stats`, served at /admin/stats): requests per instance, prompt and cached prompt tokens
per instance (the instance that computed the prompt: prefill's `num_cached_tokens`, or for a
prompt decode computed, prompt minus `num_prompt_tokens_computed`), routes by reason, and the last
`RECENT_DECISIONS` decisions by request id (prefill, decode, reason, hits looked up, cached tokens).

Failures: a prefill that fails (not for bad input) is retried on another prefill, then skipped
(decode recomputes the prompt); a decode that dies mid-stream is replaced by another decode that
recomputes prompt + tokens so far and continues, so the client's stream goes on without
duplicates. When nothing is left to try, the request fails fast with EngineDeadError. Torch-free.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.engine_client import EngineDeadError, TokenizerLike
from pdserve.common.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pdserve.common.sampling_params import ParameterError, SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import (finish_reason_from_proto, sampling_params_to_proto, stop_reason_from_proto,
                                   token_logprobs_from_proto)
from pdserve.services.router.instances import InstancePool

log = logging.getLogger("pdserve.router")

RECENT_DECISIONS = 512


@dataclass
class _Seq:
    detok: IncrementalDetokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, tokens: list[int], logprobs: list, finish_reason: str | None, stop_reason) -> None:
        self.token_ids += tokens
        self.logprobs += logprobs
        text_tokens = tokens
        if (finish_reason == "stop" and not isinstance(stop_reason, str) and tokens
                and not self.params.include_stop_str_in_output):
            text_tokens = tokens[:-1]  # the stop token / EOS is not part of the text
        matched = self.detok.add_tokens(text_tokens) if text_tokens else None
        if matched is not None and finish_reason is None:
            finish_reason, stop_reason = "stop", matched
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason


class DisaggClient:
    def __init__(self, tokenizer: TokenizerLike, model_name: str, pool: InstancePool,
                 prefill_timeout_s: float = 60.0, decode_timeout_s: float = 600.0):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pool = pool
        self.prefill_timeout_s = prefill_timeout_s
        self.decode_timeout_s = decode_timeout_s
        self.stats = {"prefill_retries": 0, "decode_resubmits": 0, "kv_bytes": 0, "handoffs": 0,
                      "recomputed_prompt_tokens": 0, "requests_by_instance": {}, "prompt_tokens": 0,
                      "cached_prompt_tokens": 0, "prompt_tokens_by_instance": {}, "cached_tokens_by_instance": {},
                      "routes": {}}
        self.recent: deque[dict] = deque(maxlen=RECENT_DECISIONS)

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len

    async def is_healthy(self) -> bool:
        return bool(self.pool.live("prefill") or self.pool.live("decode"))

    async def abort(self, request_id: str) -> None:
        return None  # cancelling the gRPC stream (generator close) aborts on the worker

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None):
        if not prompt_token_ids:
            raise ParameterError("prompt", "the prompt is empty: give at least one token")
        if len(prompt_token_ids) > self.max_model_len:
            raise ParameterError("prompt", f"this model's maximum context length is {self.max_model_len} tokens, "
                                           f"but the prompt has {len(prompt_token_ids)} tokens")
        arrival = time.time()
        seqs = [_Seq(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                            params.include_stop_str_in_output, params.skip_special_tokens), params)
                for _ in range(params.n)]
        metrics = RequestMetrics(arrival_time=arrival)
        route = await self.pool.route(prompt_token_ids)
        decision = self._record(request_id, route)
        reserved = self.pool.info(route.decode)
        if reserved is not None:  # counts as load there from now on, so concurrent routes spread
            self.pool.begin(reserved.instance_id)
        stream = self._generate(request_id, prompt, prompt_token_ids, params, seqs, metrics, route, decision,
                                reserved)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # runs its cleanup now (cancels a Decode stream: aborts on the worker)
            if reserved is not None:
                self.pool.end(reserved.instance_id)

    async def _generate(self, request_id, prompt, prompt_token_ids, params, seqs, metrics, route, decision, reserved):
        resp = None
        if route.prefill is not None:
            resp = await self._prefill(request_id, prompt_token_ids, params, self.pool.info(route.prefill), decision)
        handle = None
        if resp is not None:
            for ft in resp.first_tokens:
                lps = [token_logprobs_from_proto(ft.logprobs)] if ft.HasField("logprobs") else []
                seqs[ft.index].add([ft.token_id], lps, finish_reason_from_proto(ft.finish_reason),
                                   stop_reason_from_proto(ft))
            metrics.first_token_time = time.time()
            metrics.num_cached_prompt_tokens = resp.num_cached_tokens
            handle = resp.handle if resp.HasField("handle") else None
            yield self._output(request_id, prompt, prompt_token_ids, seqs, metrics)
            if all(s.finish_reason for s in seqs):
                if handle is not None:
                    await self._release(handle)
                return
        tried: set[str] = set()
        while not all(s.finish_reason for s in seqs):
            inst = reserved if reserved is not None and not tried else self.pool.choose("decode", exclude=tried)
            if inst is None:
                raise EngineDeadError("no decode instance is available" + (" (all failed)" if tried else ""))
            computes_prompt = handle is None and decision["computed_on"] is None
            req = pb.DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                   params=sampling_params_to_proto(params))
            if handle is not None:
                req.handle.CopyFrom(handle)
            for i, s in enumerate(seqs):
                if s.token_ids:
                    req.sequences.append(pb.SequenceState(index=i, output_token_ids=s.token_ids))
            self._count(inst)
            decision["decode"] = inst.instance_id
            counted = inst is not reserved  # the reserved one is counted for the whole request
            if counted:
                self.pool.begin(inst.instance_id)
            call = self.pool.decode_stub(inst).Decode(req, timeout=self.decode_timeout_s)
            first_chunk = True
            try:
                async for chunk in call:
                    if chunk.kv_bytes_received:
                        self.stats["kv_bytes"] += chunk.kv_bytes_received
                        self.stats["handoffs"] += 1
                    self.stats["recomputed_prompt_tokens"] += chunk.num_prompt_tokens_computed
                    if first_chunk and computes_prompt:
                        cached = max(len(prompt_token_ids) - chunk.num_prompt_tokens_computed, 0)
                        self._prompt_served(decision, inst, len(prompt_token_ids), cached)
                        metrics.num_cached_prompt_tokens = cached
                    first_chunk = False
                    for d in chunk.sequences:
                        seqs[d.index].add(list(d.new_token_ids), [token_logprobs_from_proto(x) for x in d.new_logprobs],
                                          finish_reason_from_proto(d.finish_reason), stop_reason_from_proto(d))
                    if metrics.first_token_time is None and any(s.token_ids for s in seqs):
                        metrics.first_token_time = time.time()
                    if chunk.error:
                        out = self._output(request_id, prompt, prompt_token_ids, seqs, metrics, error=chunk.error)
                        yield out
                        return
                    if chunk.sequences:
                        yield self._output(request_id, prompt, prompt_token_ids, seqs, metrics)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ParameterError("prompt", e.details()) from None
                log.warning("decode %s failed for %s (%s); resubmitting", inst.instance_id, request_id, e.code())
                tried.add(inst.instance_id)
                self.pool.mark_failed(inst.instance_id)
                self.stats["decode_resubmits"] += 1
                handle = None  # the KV went with the dead decode: the next one recomputes
                continue
            finally:
                call.cancel()
                if counted:
                    self.pool.end(inst.instance_id)
            if not all(s.finish_reason for s in seqs):
                raise EngineDeadError(f"decode {inst.instance_id} ended the stream before the request finished")

    async def _prefill(self, request_id, prompt_token_ids, params, first_choice, decision) -> pb.PrefillResponse | None:
        tried: set[str] = set()
        while True:
            inst = first_choice if first_choice is not None and not tried else \
                self.pool.choose("prefill", exclude=tried)
            if inst is None:
                return None  # no prefill left: decode computes the prompt itself
            self._count(inst)
            decision["prefill"] = inst.instance_id
            self.pool.begin(inst.instance_id)
            try:
                resp = await self.pool.prefill_stub(inst).Prefill(
                    pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                      params=sampling_params_to_proto(params)), timeout=self.prefill_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ParameterError(_param_of(e.details()), e.details()) from None
                log.warning("prefill %s failed for %s (%s); trying another", inst.instance_id, request_id, e.code())
                tried.add(inst.instance_id)
                self.pool.mark_failed(inst.instance_id)
                self.stats["prefill_retries"] += 1
                continue
            finally:
                self.pool.end(inst.instance_id)
            self._prompt_served(decision, inst, len(prompt_token_ids), resp.num_cached_tokens)
            return resp

    def _record(self, request_id: str, route) -> dict:
        """One routing decision, kept in `recent` (newest last) for /admin/stats and tests."""
        reasons = self.stats["routes"]
        reasons[route.reason] = reasons.get(route.reason, 0) + 1
        decision = {"request_id": request_id, "reason": route.reason, "prefill": route.prefill,
                    "decode": route.decode, "hit_blocks": route.hit_blocks, "computed_on": None,
                    "cached_tokens": None}
        self.recent.append(decision)
        return decision

    def _prompt_served(self, decision: dict, inst, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """The prompt was computed on `inst` with `num_cached_tokens` prefix-cache hits (hit counters)."""
        decision["computed_on"], decision["cached_tokens"] = inst.instance_id, num_cached_tokens
        iid = inst.instance_id
        self.stats["prompt_tokens"] += num_prompt_tokens
        self.stats["cached_prompt_tokens"] += num_cached_tokens
        for key, value in (("prompt_tokens_by_instance", num_prompt_tokens),
                           ("cached_tokens_by_instance", num_cached_tokens)):
            self.stats[key][iid] = self.stats[key].get(iid, 0) + value
        self.pool.observe_prefill(num_prompt_tokens, num_cached_tokens, inst.block_size)

    def _count(self, inst) -> None:
        by = self.stats["requests_by_instance"]
        by[inst.instance_id] = by.get(inst.instance_id, 0) + 1

    async def _release(self, handle: pb.KVHandle) -> None:
        try:
            await self.pool.stub_for_address(handle.control_address).ReleaseLease(
                pb.ReleaseLeaseRequest(lease_id=handle.lease_id), timeout=2)
        except grpc.aio.AioRpcError:
            pass  # the lease expires on its own

    def _output(self, request_id, prompt, prompt_ids, seqs: list[_Seq], metrics, error=None) -> RequestOutput:
        finished = error is not None or all(s.finish_reason for s in seqs)
        outs = [CompletionOutput(index=i, text=s.detok.visible_text(s.finish_reason is not None),
                                 token_ids=list(s.token_ids),
                                 cumulative_logprob=sum(e[t].logprob for t, e in zip(s.token_ids, s.logprobs))
                                 if s.params.logprobs is not None and s.logprobs else None,
                                 logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
                                 finish_reason=s.finish_reason or ("error" if error else None),
                                 stop_reason=s.stop_reason) for i, s in enumerate(seqs)]
        if finished:
            metrics.finished_time = time.time()
        return RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=list(prompt_ids), outputs=outs,
                             finished=finished, metrics=metrics, num_cached_tokens=metrics.num_cached_prompt_tokens,
                             error=error)


def _param_of(details: str) -> str:
    head = details.split(":", 1)[0]
    return head if head.isidentifier() else "prompt"
