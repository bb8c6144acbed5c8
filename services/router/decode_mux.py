"""The router's end of DecodeStream: every request it routes to one decode worker over one stream.

    DecodeMuxes.open(stub, address, DecodeRequest, timeout_s) -> MuxedDecode
        the worker's DecodeMux (started on first use) sends DecodeStreamRequest{open}
    DecodeMux reader task: async for DecodeChunks in the call: each chunk, and each packed row
                          (a PackedDelta: tokens and maybe the end, proto/convert.py), -> its
                          request's queue
    MuxedDecode (one request, what `_run` in disagg_client.py reads):
        async for batch in it    every DecodeChunk / PackedDelta queued since the last batch
                                 (at least one): the router's work per batch, not per token,
                                 when it lags
        abort(indices)           a stop string ended sequences: DecodeStreamRequest{stop}
        interrupt(error)         the reader raises `error` after what is queued (the router aborts
                                 its requests at shutdown)
        close()                  done with it; unfinished: DecodeStreamRequest{cancel} (the
                                 client went away: decode aborts it and frees its blocks)
    the stream fails (decode died, connection lost) -> every open request raises DecodeStreamError
    (the call's status code: the router resubmits elsewhere, as for a failed Decode call), and
    the next open to that address starts a new stream; a chunk with status_code (refused at
    admission, engine dead) raises DecodeStreamError for that request only; a request's deadline
    (--decode-timeout) raises DEADLINE_EXCEEDED and cancels it on decode.

Why (issue 11): a Decode call per request costs the decode worker and the router one gRPC message,
one coroutine wake-up and one write per request per engine step; here a step costs one message
for all of a worker's requests. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve.common.queued import take_queued
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import unpack_rows

log = logging.getLogger("pdserve.router")


class DecodeStreamError(Exception):
    """A request's Decode ended with a gRPC status (the call's, or the one its chunk carried)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class DecodeMux:
    """One DecodeStream call to one decode worker, shared by the requests routed there."""

    def __init__(self, stub):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self.broken = False
        self._call = stub.DecodeStream(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self):
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            yield message

    async def _read(self) -> None:
        try:
            async for message in self._call:
                queues = self._queues
                for chunk in message.chunks:
                    q = queues.get(chunk.request_id)
                    if q is not None:
                        q.put_nowait(chunk)
                for rid, delta in unpack_rows(message):
                    q = queues.get(rid)
                    if q is not None:
                        q.put_nowait(delta)
            error = DecodeStreamError(grpc.StatusCode.UNAVAILABLE, "the decode worker ended its DecodeStream")
        except grpc.aio.AioRpcError as e:
            error = DecodeStreamError(e.code(), e.details() or "")
        except asyncio.CancelledError:
            error = DecodeStreamError(grpc.StatusCode.CANCELLED, "the router closed the DecodeStream")
        self.broken = True
        for q in self._queues.values():
            q.put_nowait(error)
        self._queues.clear()

    def open(self, request: pb.DecodeRequest, timeout_s: float) -> "MuxedDecode":
        rid = request.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._outbox.put_nowait(pb.DecodeStreamRequest(open=request))
        deadline = asyncio.get_running_loop().call_later(
            timeout_s, q.put_nowait, DecodeStreamError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end in {timeout_s} s"))
        return MuxedDecode(self, rid, q, deadline)

    def send(self, message: pb.DecodeStreamRequest) -> None:
        if not self.broken:
            self._outbox.put_nowait(message)

    def forget(self, rid: str) -> None:
        self._queues.pop(rid, None)

    def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()


class MuxedDecode:
    """One request on a DecodeMux, read as batches of DecodeChunks."""

    def __init__(self, mux: DecodeMux, rid: str, q: asyncio.Queue, deadline: asyncio.TimerHandle):
        self.mux, self.rid, self._q, self._deadline = mux, rid, q, deadline
        self._held: Exception | None = None  # an error found behind a batch: raised next
        self.finished = False

    def __aiter__(self) -> "MuxedDecode":
        return self

    async def __anext__(self) -> list:  # of pb.DecodeChunk and PackedDelta
        if self.finished:
            raise StopAsyncIteration
        item, self._held = (self._held, None) if self._held is not None else (await self._q.get(), None)
        if isinstance(item, Exception):
            raise item
        batch, self._held = take_queued(self._q, item, lambda x: isinstance(x, Exception))
        for i, chunk in enumerate(batch):
            if chunk.status_code:
                error = DecodeStreamError(_CODES.get(chunk.status_code, grpc.StatusCode.UNKNOWN), chunk.error)
                self.finished = True  # decode has forgotten it: nothing to cancel
                if i == 0:
                    raise error
                self._held = error
                return batch[:i]
            if chunk.finished:
                self.finished = True
        return batch

    async def abort(self, indices: list[int]) -> None:
        self.mux.send(pb.DecodeStreamRequest(stop=pb.AbortRequest(request_id=self.rid, indices=indices)))

    def interrupt(self, error: Exception) -> None:
        """The reader raises `error` once it has taken the chunks that came before it."""
        self._q.put_nowait(error)

    def close(self) -> None:
        self._deadline.cancel()
        self.mux.forget(self.rid)
        if not self.finished:
            self.mux.send(pb.DecodeStreamRequest(cancel=self.rid))


class DecodeMuxes:
    """One DecodeMux per decode worker address, replaced once its stream has failed."""

    def __init__(self):
        self._muxes: dict[str, DecodeMux] = {}

    def open(self, stub, address: str, request: pb.DecodeRequest, timeout_s: float) -> MuxedDecode:
        mux = self._muxes.get(address)
        if mux is None or mux.broken:
            mux = self._muxes[address] = DecodeMux(stub)
        return mux.open(request, timeout_s)

    def close(self) -> None:
        for mux in self._muxes.values():
            mux.close()
        self._muxes.clear()
