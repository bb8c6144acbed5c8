"""DisaggClient: the EngineClient of `pdserve router` — one request over prefill and decode services.

    generate():  route = pool.route(prompt)  (prefix hits vs load, routing.py; one Redis call)
                 route.prefill --gRPC Prefill--> first-token deltas + KV handle
                 route.decode  --DecodeStream{open + handle}--> token deltas, over the one stream
                   this router keeps to that decode worker for all its requests (decode_mux.py;
                   --decode-streams per-request: a Decode call each, stream_drain.py); the chunks
                   queued meanwhile are taken as one batch, one output
                 every delta --> RequestState (common/output_processor.py): detokenized and
                 matched against stop strings once, here, as `pdserve serve` does in-process
                 route.prefill None (short or decode-cached prompt): Decode without a handle,
                 decode computes the prompt itself (conditional disaggregation)

A stop string that ends one of n sequences is sent to decode as Abort{indices}; when every
sequence has ended the Decode stream is closed (which aborts it there). Prompt logprobs come
from whoever computed the prompt (the prefill, or decode when it computed it), so the router
strips them from a Decode that carries a handle.

Counters (`stats`: RouterStats, served at /admin/stats and /metrics): requests per instance,
prompt and cached prompt tokens per instance (the instance that computed the prompt: prefill's
`num_cached_tokens`, or for a prompt decode computed, prompt minus `num_prompt_tokens_computed`),
routes by reason, and the last `RECENT_DECISIONS` decisions by request id.

Failures: a prefill that fails (not for bad input) is retried on another prefill, then skipped
(decode recomputes the prompt); a decode that dies mid-stream is replaced by another decode that
recomputes prompt + tokens so far and continues, so the client's stream goes on without
duplicates. An engine error reported by a worker (FINISH_REASON_ERROR) fails the request: it is
not resubmitted. When nothing is left to try, the request fails fast with EngineDeadError.

Every request in flight is a `_Flight`: the KV lease its prefill answered with (released here
when the request ends before a decode pulled it, not left to its TTL on the prefill, also when
the request is cancelled at the instant the answer arrives) and what `abort_all` interrupts (at
shutdown, before uvicorn's grace period ends: each request ends with finish_reason "abort", as
AsyncLLM.abort_all ends `serve`'s).
Torch-free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque

import grpc

from pdserve.common.engine_client import EngineDeadError, TokenizerLike
from pdserve.common.output_processor import RequestState
from pdserve.common.sampling_params import ParameterError, SamplingParams
from pdserve.common.stats import RouterStats
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import PackedDelta, delta_from_proto, prompt_logprobs_from_proto, sampling_params_to_proto
from pdserve.services.router.decode_mux import DecodeMuxes, DecodeStreamError
from pdserve.services.router.instances import InstancePool
from pdserve.services.router.stream_drain import DrainedStream

log = logging.getLogger("pdserve.router")

RECENT_DECISIONS = 512
# A request resubmitted to decode this many times (each after a decode failed it) then fails: a
# lone decode that restarts is tried again once it serves, a crash-looping one not forever.
MAX_DECODE_RESUBMITS = 8


class DisaggClient:
    def __init__(self, tokenizer: TokenizerLike, model_name: str, pool: InstancePool,
                 prefill_timeout_s: float = 60.0, decode_timeout_s: float = 600.0,
                 no_instance_timeout_s: float = 5.0, shared_decode_streams: bool = True):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pool = pool
        self.prefill_timeout_s = prefill_timeout_s
        self.decode_timeout_s = decode_timeout_s
        self.no_instance_timeout_s = no_instance_timeout_s  # wait this long for a decode to (re)appear
        self.stats = RouterStats()
        # one DecodeStream per decode worker for all requests (None: a Decode call per request)
        self.decode_muxes = DecodeMuxes() if shared_decode_streams else None
        self.recent: deque[dict] = deque(maxlen=RECENT_DECISIONS)
        self._flights: set[_Flight] = set()  # the requests in flight
        self._pending: set[asyncio.Future] = set()  # lease releases on their way (and answers awaited for theirs)

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len

    async def is_healthy(self) -> bool:
        return bool(self.pool.live("prefill") or self.pool.live("decode"))

    async def abort(self, request_id: str) -> None:
        return None  # cancelling the gRPC stream (generator close) aborts on the worker

    def abort_all(self) -> int:
        """End every request in flight with finish_reason "abort" (each consumer gets its last
        output; its Prefill call is cancelled, its decode stream cancelled on the worker, its lease
        released). -> how many there were."""
        flights = list(self._flights)
        for flight in flights:
            flight.abort()
        return len(flights)

    async def close(self) -> None:
        """Wait for the lease releases still on their way (each bounded by its call's timeout)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None):
        """The request was validated by the front end (services/router/app.py) that called this."""
        state = RequestState(self.tokenizer, request_id, prompt, prompt_token_ids, params)
        flight = _Flight()
        self._flights.add(flight)
        reserved = None
        try:
            route = await self.pool.route(prompt_token_ids)
            decision = self._record(request_id, route)
            reserved = self.pool.info(route.decode)
            if reserved is not None:  # counts as load there from now on, so concurrent routes spread
                self.pool.begin(reserved.instance_id)
            stream = self._run(request_id, prompt_token_ids, params, state, route, decision, reserved, flight)
            try:
                async for out in stream:
                    yield out
            except _Aborted:
                state.abort()
                yield state.output()
            finally:
                await stream.aclose()  # runs its cleanup now (cancels a Decode stream: aborts on the worker)
        finally:
            self._flights.discard(flight)
            if reserved is not None:
                self.pool.end(reserved.instance_id)
            if flight.handle is not None and not flight.pulled:  # ended before a decode pulled it
                self._release_soon(flight.handle)

    async def _run(self, request_id, prompt_token_ids, params, state: RequestState, route, decision, reserved,
                   flight: "_Flight"):
        handle = None
        flight.check()
        if params.prompt_logprobs is not None and len(prompt_token_ids) == 1:
            state.set_prompt_logprobs([None])  # the first token has none, and no worker sends an empty list
        if route.prefill is not None:
            try:
                resp = await self._prefill(request_id, prompt_token_ids, params, self.pool.info(route.prefill),
                                           decision, flight)
            except _EngineFailed as e:
                state.fail(str(e))
                yield state.output()
                return
            if resp is not None:
                for d in resp.sequences:
                    state.add(delta_from_proto(request_id, d))
                state.metrics.num_cached_prompt_tokens = resp.num_cached_tokens
                state.set_prompt_logprobs(prompt_logprobs_from_proto(resp.prompt_logprobs))
                handle = resp.handle if resp.HasField("handle") else None
                yield state.output()
                if state.finished:
                    return
        tried: set[str] = set()  # decode instances that failed this request
        resubmits = 0
        while not state.finished:
            flight.check()
            if reserved is not None and not tried:
                inst = reserved
            elif resubmits > MAX_DECODE_RESUBMITS:
                raise EngineDeadError(f"the request failed on decode {resubmits} times")
            else:  # another decode first; else one that failed it, once it serves again (InstancePool.live)
                inst = self.pool.choose("decode", exclude=tried) or await self.pool.wait_for(
                    "decode", timeout_s=self.no_instance_timeout_s, retry_failed=True, give_up=flight.aborted)
                flight.check()
            if inst is None:  # no decode serves: a live prefill decodes it (every worker carries both services)
                inst = self.pool.choose("prefill", exclude=tried)
                if inst is not None:
                    log.warning("no decode instance for %s: decoding on prefill %s", request_id, inst.instance_id)
                    self.stats.decodes_on_prefill += 1
                    handle = None  # its prompt's KV: a prefix-cache hit where that prefill has it, else recomputed
            if inst is None:
                raise EngineDeadError("no decode or prefill instance is available" + (" (all failed)" if tried else ""))
            computes_prompt = handle is None and decision["computed_on"] is None
            decode_params = params
            if handle is not None or state.prompt_logprobs is not None:  # the prefill computed them
                decode_params = dataclasses.replace(params, prompt_logprobs=None)
            req = pb.DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                   params=sampling_params_to_proto(decode_params))
            if handle is not None:
                req.handle.CopyFrom(handle)
            for i, s in enumerate(state.seqs):
                if s.token_ids:
                    req.sequences.append(pb.SequenceState(index=i, output_token_ids=s.token_ids,
                                                          finished=s.finish_reason is not None))
            self.stats.count("requests_by_instance", inst.instance_id)
            decision["decode"] = inst.instance_id
            counted = inst is not reserved  # the reserved one is counted for the whole request
            if counted:
                self.pool.begin(inst.instance_id)
            stub = self.pool.decode_stub(inst)
            if self.decode_muxes is not None:
                chunks = self.decode_muxes.open(stub, inst.grpc_address, req, self.decode_timeout_s)
            else:
                chunks = _DecodeCall(stub, req, self.decode_timeout_s)
            first_chunk = True
            flight.chunks = chunks
            try:
                async for batch in chunks:
                    stopped = []
                    for chunk in batch:
                        flight.pulled |= handle is not None  # decode answers only after its pull ended
                        if type(chunk) is PackedDelta:  # only tokens (never a request's first news)
                            if state.add(chunk.output(request_id)):
                                stopped.append(0)
                            if state.finished:
                                break
                            continue
                        if chunk.kv_bytes_received:
                            self.stats.kv_bytes += chunk.kv_bytes_received
                            self.stats.handoffs += 1
                        self.stats.recomputed_prompt_tokens += chunk.num_prompt_tokens_computed
                        if first_chunk and computes_prompt:
                            cached = max(len(prompt_token_ids) - chunk.num_prompt_tokens_computed, 0)
                            self._prompt_served(decision, inst, len(prompt_token_ids), cached)
                            state.metrics.num_cached_prompt_tokens = cached
                        first_chunk = False
                        state.set_prompt_logprobs(prompt_logprobs_from_proto(chunk.prompt_logprobs))
                        error = chunk.error or None
                        stopped += [d.index for d in chunk.sequences
                                    if state.add(delta_from_proto(request_id, d, error))]
                        if error is not None:
                            state.fail(error)
                        if state.finished:
                            break
                    yield state.output()
                    if state.finished:
                        return  # the finally cancels the stream: decode aborts what still runs
                    if stopped:
                        await chunks.abort(stopped)
            except (grpc.aio.AioRpcError, DecodeStreamError) as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _parameter_error(e.details(), params) from None
                log.warning("decode %s failed for %s (%s: %s); resubmitting", inst.instance_id, request_id,
                            e.code(), e.details())
                tried.add(inst.instance_id)
                resubmits += 1
                self.pool.mark_failed(inst.instance_id)
                self.stats.decode_resubmits += 1
                handle = None  # the KV went with the dead decode: the next one recomputes
                continue
            finally:
                flight.chunks = None
                chunks.close()  # unfinished: cancelled on decode (aborted, its blocks freed)
                if counted:
                    self.pool.end(inst.instance_id)
            if not state.finished:
                raise EngineDeadError(f"decode {inst.instance_id} ended the stream before the request finished")

    async def _prefill(self, request_id, prompt_token_ids, params, first_choice, decision,
                       flight: "_Flight") -> pb.PrefillResponse | None:
        tried: set[str] = set()
        while True:
            inst = first_choice if first_choice is not None and not tried else \
                self.pool.choose("prefill", exclude=tried)
            if inst is None:
                return None  # no prefill left: decode computes the prompt itself
            self.stats.count("requests_by_instance", inst.instance_id)
            decision["prefill"] = inst.instance_id
            self.pool.begin(inst.instance_id)
            try:
                resp = await self._answer(self.pool.prefill_stub(inst).Prefill(
                    pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                      params=sampling_params_to_proto(params)), timeout=self.prefill_timeout_s), flight)
            except grpc.aio.AioRpcError as e:
                flight.check()  # abort_all cancelled the call
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _parameter_error(e.details(), params) from None
                if e.code() == grpc.StatusCode.INTERNAL:
                    raise _EngineFailed(e.details()) from None
                log.warning("prefill %s failed for %s (%s: %s); trying another", inst.instance_id, request_id,
                            e.code(), e.details())
                tried.add(inst.instance_id)
                self.pool.mark_failed(inst.instance_id)
                self.stats.prefill_retries += 1
                continue
            finally:
                self.pool.end(inst.instance_id)
            self._prompt_served(decision, inst, len(prompt_token_ids), resp.num_cached_tokens)
            return resp

    async def _answer(self, call, flight: "_Flight") -> pb.PrefillResponse:
        """The Prefill call's answer, its lease recorded in `flight` before anything can cancel
        the request again. The call is awaited in a task of its own: a request cancelled (its
        client gone) at the instant the answer arrives would otherwise never see it, and the lease
        would wait for its TTL on the prefill. Cancelled, the request cancels the call (a no-op
        once it is answered) and an answer that came anyway has its lease released."""
        answer = asyncio.ensure_future(_awaited(call))
        flight.call = call
        try:
            resp = await asyncio.shield(answer)
        except asyncio.CancelledError:
            call.cancel()
            answer.add_done_callback(self._release_answered)
            self._track(answer)
            if flight.aborted() and not asyncio.current_task().cancelling():
                raise _Aborted from None  # abort_all cancelled the call, not the request
            raise
        finally:
            flight.call = None
        if resp.HasField("handle"):
            flight.handle = resp.handle
        return resp

    def _release_answered(self, answer: asyncio.Future) -> None:
        if not answer.cancelled() and answer.exception() is None and answer.result().HasField("handle"):
            self._release_soon(answer.result().handle)

    def _record(self, request_id: str, route) -> dict:
        """One routing decision, kept in `recent` (newest last) for /admin/stats and tests."""
        self.stats.count("routes", route.reason)
        decision = {"request_id": request_id, "reason": route.reason, "prefill": route.prefill,
                    "decode": route.decode, "hit_blocks": route.hit_blocks, "computed_on": None,
                    "cached_tokens": None}
        self.recent.append(decision)
        return decision

    def _prompt_served(self, decision: dict, inst, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """The prompt was computed on `inst` with `num_cached_tokens` prefix-cache hits (hit counters)."""
        decision["computed_on"], decision["cached_tokens"] = inst.instance_id, num_cached_tokens
        self.stats.prompt_tokens += num_prompt_tokens
        self.stats.cached_prompt_tokens += num_cached_tokens
        self.stats.count("prompt_tokens_by_instance", inst.instance_id, num_prompt_tokens)
        self.stats.count("cached_tokens_by_instance", inst.instance_id, num_cached_tokens)
        self.pool.observe_prefill(num_prompt_tokens, num_cached_tokens, inst.block_size)

    def _release_soon(self, handle: pb.KVHandle) -> None:
        """The lease released on its prefill, not waited for (`close` waits for what is left)."""
        self._track(asyncio.ensure_future(self._release(handle)))

    def _track(self, future: asyncio.Future) -> None:
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def _release(self, handle: pb.KVHandle) -> None:
        try:
            await self.pool.stub_for_address(handle.control_address).ReleaseLease(
                pb.ReleaseLeaseRequest(lease_id=handle.lease_id), timeout=2)
        except grpc.aio.AioRpcError:
            pass  # the lease expires on its own



class _DecodeCall(DrainedStream):
    """One Decode call for one request (`--decode-streams per-request`), read ahead as batches."""

    def __init__(self, stub, request: pb.DecodeRequest, timeout_s: float):
        self.stub, self.request_id = stub, request.request_id
        self.call = stub.Decode(request, timeout=timeout_s)
        super().__init__(self.call)

    async def abort(self, indices: list[int]) -> None:
        try:
            await self.stub.Abort(pb.AbortRequest(request_id=self.request_id, indices=indices), timeout=2)
        except grpc.aio.AioRpcError:
            pass  # the sequence runs on; its tokens are ignored here and the stream ends with the others

    def close(self) -> None:
        super().close()
        self.call.cancel()


class _Flight:
    """One request in flight on this router: the KV handle its prefill answered with and whether a
    decode has pulled (or given up on) it (a request that ends before that releases the lease
    itself, not after its TTL), and what `abort` interrupts: the Prefill call or the decode stream
    it waits on (either then raises _Aborted in the request)."""

    def __init__(self):
        self.handle: pb.KVHandle | None = None
        self.pulled = False
        self.call = None  # the Prefill call it waits on
        self.chunks = None  # the decode stream it reads
        self._aborted = False

    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        self._aborted = True
        if self.call is not None:
            self.call.cancel()
        if self.chunks is not None:
            self.chunks.interrupt(_Aborted())

    def check(self) -> None:
        """Raise _Aborted once aborted (at each point where the request goes on to a new call)."""
        if self._aborted:
            raise _Aborted


class _Aborted(Exception):
    """abort_all ended the request: it finishes with finish_reason "abort"."""


async def _awaited(call):
    return await call


class _EngineFailed(Exception):
    """A worker's engine failed the request itself (not the worker): reported, never retried."""


def _parameter_error(details: str, params: SamplingParams) -> ParameterError:
    """A worker's INVALID_ARGUMENT ("param: message", services/worker/state.py) as the error the
    API answers: the message without its param prefix, as `pdserve serve` words it; a grammar
    named by the API field that asked for it (guided_regex, response_format, ...), which the wire
    does not carry."""
    head, sep, message = details.partition(": ")
    if not (sep and head.isidentifier()):
        return ParameterError("prompt", details)
    if head == "structured_outputs" and params.structured_outputs is not None:
        head = params.structured_outputs.param
    return ParameterError(head, message)
