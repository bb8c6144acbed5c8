"""DecodeStream: many requests over one stream per router connection (issue 11 run 3).

    router --DecodeStreamRequest{open | stop | cancel}--> reader task
                                                            open: checks, AsyncLLM.attach(sink)
    engine thread --one call per step (AsyncLLM._deliver_all)--> sinks: each request's deltas
                                                            kept in `news` (steps not yet sent)
    router <==DecodeChunks{a packed row or a chunk per request with news}== writer (this
               call's response stream), one message per wake-up, then the servicer's interval:
               the steps of a request made meanwhile leave merged, built only then; a request
               whose news is only tokens (the steady state) is a packed row (proto/convert.py
               PackedRows: a few list appends, one bulk copy per field per message), anything
               more (its first news, logprobs, errors, n > 1) a DecodeChunk from ChunkBuilder

Why: with one Decode call per request, a step of a batch of 250 cost 250 gRPC messages, 250
coroutine wake-ups and 250 writes on the decode's event loop, and as many reads on the router's;
its per-message cost was most of the decode worker's GIL at 100 req/s (docs/benchmarks.md). Here
a step costs one message whatever the batch. Each request open here counts as an open stream
for `--stream-messages-per-s`: the router gets as many chunks a second as before (its per-chunk
work, one output and one SSE event each, is what that cap protects), in far fewer messages.

The per-request rules stay those of `Decode` (`ChunkBuilder` builds the chunks of both): a
request refused at admission gets one chunk with `status_code` and `error`; the engine dying
ends each request with status UNAVAILABLE, "engine dead: ..." (the router resubmits elsewhere,
as for a failed Decode call); `cancel` (the router's client went away) aborts the request and
frees its blocks; the stream's end aborts every request still open.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from pdserve.common.engine_client import EngineDeadError
from pdserve.common.outputs import merge_step_outputs
from pdserve.common.request import child_request_id
from pdserve.common.sampling_params import ParameterError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import PackedRows, delta_to_proto, prompt_logprobs_to_proto

log = logging.getLogger("pdserve.decode")


class DecodeMux:
    """One DecodeStream call: the requests opened on it and the chunks not yet sent."""

    def __init__(self, servicer, request_iterator):
        self.servicer = servicer
        self.engine = servicer.engine
        self.requests = request_iterator
        self.open: dict[str, "ChunkBuilder"] = {}  # request id -> its chunk state
        self.news: dict[str, list] = {}  # request id -> its steps' deltas not yet sent
        self.pending: list[pb.DecodeChunk] = []  # chunks built, not yet sent
        self.packed = PackedRows()  # packed rows built, not yet sent
        self.wake = asyncio.Event()
        self.first_news = asyncio.Event()  # a request's first delta: it ends the interval's wait
        self.reading = True

    async def chunks(self):
        """The response stream: DecodeChunks of everything pending, one message per wake-up."""
        reader = asyncio.ensure_future(self._read())
        try:
            while self.reading or self.open or self.pending or self.packed or self.news:
                await self.wake.wait()
                self.wake.clear()
                metrics = self.engine.metrics_batch()  # the message's tokens counted at once
                for rid in list(self.news):
                    self._build(rid, metrics)
                if metrics is not None:
                    metrics.flush()
                if self.pending or self.packed:
                    message = pb.DecodeChunks(chunks=self.pending)
                    self.pending = []
                    self.packed.fill(message)
                    yield message
                    interval = self.servicer.interval_s()
                    if interval and self.open:  # the steps meanwhile: one message, but a request's
                        try:  # first tokens (decode's TTFT when it computed the prompt) go at once
                            await asyncio.wait_for(self.first_news.wait(), interval)
                        except asyncio.TimeoutError:
                            pass
                        self.first_news.clear()
        finally:
            reader.cancel()
            for rid in list(self.open):  # the router went away (or the stream broke): free everything
                self._close(rid, abort=True)

    async def _read(self) -> None:
        try:
            async for msg in self.requests:
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    await self._open(msg.open)
                elif kind == "cancel" and msg.cancel in self.open:
                    self._close(msg.cancel, abort=True)
                elif kind == "stop" and msg.stop.request_id in self.open:
                    rid, indices = msg.stop.request_id, list(msg.stop.indices)
                    self.engine.stop_sequences([(rid, i) for i in indices or range(self.open[rid].params.n)])
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            self.reading = False
            self.wake.set()

    async def _open(self, request: pb.DecodeRequest) -> None:
        rid = request.request_id
        try:
            admitted = self.servicer.admit(request)
            builder = ChunkBuilder(self.servicer, request, *admitted)
            self.open[rid] = builder
            self.servicer.open_streams += 1  # a request streamed here counts as one (--stream-messages-per-s)
            await self.engine.attach(rid, builder.prompt, builder.params, functools.partial(self._on_news, rid),
                                     output_token_ids=builder.given, kv_transfer=builder.spec,
                                     finished_indices=builder.finished)
        except ParameterError as e:
            self._drop(rid)
            self._refuse(rid, grpc.StatusCode.INVALID_ARGUMENT, f"{e.param}: {e}")
        except EngineDeadError as e:  # the router tries another decode (this worker is exiting)
            self._drop(rid)
            self._refuse(rid, grpc.StatusCode.UNAVAILABLE, f"engine dead: {e}")
        except Exception as e:  # a bug: the router tries another decode
            self._drop(rid)
            self._refuse(rid, grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")

    def _on_news(self, rid: str, item) -> None:
        """Called on this event loop by the engine thread's delivery: one step's deltas, or an error."""
        steps = self.news.get(rid)  # (a request with news waiting is open: _close drops its news)
        if steps is not None and not isinstance(item, BaseException):
            steps.append(item)  # the usual case under load: its last step is not sent yet
            return
        if rid not in self.open:
            return  # cancelled meanwhile
        if not isinstance(item, BaseException):
            self.news[rid] = [item]
            self.wake.set()
            if self.open[rid].first:
                self.first_news.set()
            return
        self._build(rid)  # what came before the error goes first
        if rid in self.open:
            self._drop(rid)
            self.engine.detach(rid, abort=True)
            code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(item, ParameterError) else grpc.StatusCode.UNKNOWN
            detail = f"{item.param}: {item}" if isinstance(item, ParameterError) else f"{type(item).__name__}: {item}"
            if isinstance(item, EngineDeadError):
                log.error("decode stream: %s", item)
                code, detail = grpc.StatusCode.UNAVAILABLE, f"engine dead: {item}"
            self._refuse(rid, code, detail)

    def _build(self, rid: str, metrics=None) -> None:
        """A request's steps not yet sent -> a packed row or a DecodeChunk in `pending`
        (`metrics`: the message's MetricsBatch)."""
        steps = self.news.pop(rid, None)
        builder = self.open.get(rid)
        if not steps or builder is None:
            return
        outs = steps[0] if len(steps) == 1 else functools.reduce(merge_step_outputs, steps)
        self.engine.observe(rid, outs, metrics)
        if builder.packable(outs):  # the steady state: tokens only
            out = outs[0]
            self.packed.add(rid, out.new_token_ids, out.finish_reason)
            if out.finish_reason is not None:
                self._close(rid, abort=False)
            return
        chunk = builder.chunk(outs)
        self.pending.append(chunk)
        if chunk.finished:
            self._close(rid, abort=False)

    def _refuse(self, rid: str, code: grpc.StatusCode, detail: str) -> None:
        self.pending.append(pb.DecodeChunk(request_id=rid, finished=True, error=detail, status_code=code.value[0]))
        self.wake.set()
        self.first_news.set()

    def _close(self, rid: str, abort: bool) -> None:
        self._drop(rid)
        self.news.pop(rid, None)
        self.engine.detach(rid, abort=abort)

    def _drop(self, rid: str) -> None:
        if self.open.pop(rid, None) is not None:
            self.servicer.open_streams -= 1


class ChunkBuilder:
    """One request's deltas -> DecodeChunks (the first one carries the KV transfer's numbers)."""

    def __init__(self, servicer, request: pb.DecodeRequest, params, prompt, given, spec, finished):
        self.connector = servicer.connector
        self.rid = request.request_id
        self.params, self.prompt, self.given, self.spec, self.finished = params, prompt, given, spec, finished
        self.done = set(finished)
        self.first = True

    def packable(self, outs) -> bool:
        """This news fits a packed row: one sequence's tokens and maybe its end (EOS, length or
        abort), after the first chunk (which carries the KV transfer's and the prompt's numbers)."""
        if self.first or len(outs) != 1 or self.params.n != 1:
            return False
        out = outs[0]
        return (out.new_logprobs is None and out.error is None and out.stop_reason is None
                and out.prompt_logprobs is None and out.num_computed_prompt_tokens is None)

    def chunk(self, outs) -> pb.DecodeChunk:
        chunk = pb.DecodeChunk(request_id=self.rid)
        for out in outs:
            if out.index == 0 and out.num_computed_prompt_tokens is not None:
                chunk.num_prompt_tokens_computed = out.num_computed_prompt_tokens
                if out.prompt_logprobs is not None:
                    chunk.prompt_logprobs.extend(prompt_logprobs_to_proto(self.prompt, out.prompt_logprobs))
            if out.error:
                chunk.error = out.error
            if out.finished:
                self.done.add(out.index)
            chunk.sequences.append(delta_to_proto(out))
        if self.first:
            self.first = False
            result = self.connector.take_result(child_request_id(self.rid, 0, self.params.n))
            if result is not None:
                chunk.kv_bytes_received = result.nbytes
                chunk.kv_transfer_seconds = result.seconds
                chunk.kv_transfer_error = result.error or ""
        chunk.finished = len(self.done) == self.params.n
        return chunk
