"""Decode service: request + KV handle -> pull the prompt's KV -> continue in the batch -> token deltas.

The request's queues on this worker:

    gRPC Decode --> engine WAITING --> WAITING_FOR_KV (own prefix hits + fresh blocks reserved;
    the engine's KV connector, `PullConnector`, pulls from the prefill's KV server under a
    deadline, then releases the lease) --> WAITING (prompt computed) --> RUNNING --> streamed

A pull that fails (prefill gone, lease expired, deadline) frees the reserved blocks and the
request is computed here from the prompt. A request without a handle (short prompt sent straight
to decode, or a resubmission) is computed the same way. Tokens stream out as the engine's deltas
(SequenceDelta); the router detokenizes. With `--stream-interval-ms` (default 20) the servicer
waits that long after each message, and the steps made meanwhile leave as one (AsyncLLM.stream
coalesces them): fewer, larger messages for the router, whose per-message cost limits 1P1D under
load. The router uses `DecodeStream` (services/decode/mux.py): one stream per router carrying all
its requests, one message per interval for all of them; `Decode` (a stream per request) stays for
other callers and `pdserve router --decode-streams per-request`. Every worker carries this service
next to the Prefill service (services/worker/).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc

from pdserve.common.config import ConfigError
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.kv_transfer.connector import PullConnector, PullSpec
from pdserve.common.kv_transfer.tp_pull import KVShardAddress
from pdserve.common.sampling_params import ParameterError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services import grpc_auth
from pdserve.services.decode.mux import ChunkBuilder, DecodeMux
from pdserve.services.worker.state import WorkerState


def pull_spec(handle: pb.KVHandle) -> PullSpec:
    return PullSpec(transport=handle.transport, address=handle.transfer_address, lease_id=handle.lease_id,
                    num_tokens=handle.num_tokens, block_size=handle.block_size,
                    control_address=handle.control_address,
                    shards=tuple(KVShardAddress(s.transfer_address, s.first_kv_head, s.num_kv_heads)
                                 for s in handle.shards),
                    num_kv_heads=handle.num_kv_heads or None)


class LeaseReleaser:
    """Tells prefill workers that their leases' blocks may go (a lease expires by itself if this
    fails), over one cached channel per prefill worker: a channel per release cost a TCP and
    HTTP/2 handshake per request on both workers (at 100 requests/s, 100 new connections a
    second, and a few % of the decode's GIL in channel set-up alone)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __call__(self, spec: PullSpec) -> None:
        channel = self._channels.get(spec.control_address)
        if channel is None:
            channel = self._channels[spec.control_address] = grpc_auth.channel(spec.control_address, self.token)
        try:
            await pb_grpc.PrefillStub(channel).ReleaseLease(pb.ReleaseLeaseRequest(lease_id=spec.lease_id),
                                                            timeout=2)
        except grpc.RpcError:
            pass  # the channel reconnects by itself; a prefill worker gone for good is dropped by close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, state: WorkerState, connector: PullConnector, stream_interval_s: float = 0.0,
                 max_messages_per_s: float = 0.0):
        if not stream_interval_s >= 0:
            raise ConfigError(f"--stream-interval-ms must be >= 0, got {stream_interval_s * 1000}")
        if not max_messages_per_s >= 0:
            raise ConfigError(f"--stream-messages-per-s must be >= 0, got {max_messages_per_s}")
        self.state = state
        self.engine = state.engine
        self.connector = connector
        self.stream_interval_s = stream_interval_s
        self.max_messages_per_s = max_messages_per_s
        self.open_streams = 0

    def interval_s(self) -> float:
        """A stream's wait between messages now: the configured interval, or longer while so many
        streams are open that together they would send more than max_messages_per_s."""
        if not self.max_messages_per_s:
            return self.stream_interval_s
        return max(self.stream_interval_s, self.open_streams / self.max_messages_per_s)

    def admit(self, request: pb.DecodeRequest) -> tuple:
        """(params, prompt, tokens given per sequence or None, pull spec or None, finished indices)
        of a DecodeRequest; ParameterError naming the bad field."""
        params, prompt = self.state.checked(request)
        seqs = sorted(request.sequences, key=lambda s: s.index)
        given = [list(s.output_token_ids) for s in seqs] or None
        finished = [s.index for s in seqs if s.finished]
        spec = pull_spec(request.handle) if request.HasField("handle") and given else None
        return params, prompt, given, spec, finished

    async def Decode(self, request: pb.DecodeRequest, context):
        try:
            admitted = self.admit(request)
        except ParameterError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.param}: {e}")
        self.open_streams += 1
        try:
            async with aclosing(self._chunks(request, admitted)) as chunks:
                async for chunk in chunks:
                    yield chunk
                    interval = self.interval_s()
                    if interval and not chunk.finished:
                        await asyncio.sleep(interval)  # the steps meanwhile: one message
        except EngineDeadError as e:  # the router resubmits to another decode (the worker is exiting)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine dead: {e}")
        finally:
            self.open_streams -= 1

    async def _chunks(self, request: pb.DecodeRequest, admitted: tuple):
        """The request's DecodeChunks, one per item of the engine's stream."""
        builder = ChunkBuilder(self, request, *admitted)
        async for outs in self.engine.stream(builder.rid, builder.prompt, builder.params,
                                             output_token_ids=builder.given, kv_transfer=builder.spec,
                                             finished_indices=builder.finished):
            yield builder.chunk(outs)

    async def DecodeStream(self, request_iterator, context):
        """Many requests over one stream (services/decode/mux.py); the stream interval (and the
        cap on messages a second, each request counted as a stream) applies to its messages,
        each of which carries every open request's news."""
        async with aclosing(DecodeMux(self, request_iterator).chunks()) as messages:
            async for message in messages:
                yield message

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        """Finish sequences of a running request (a stop string the router matched)."""
        rid, indices = request.request_id, list(request.indices)

        def stop(core) -> bool:
            children = core.requests.get(rid)
            if children is None:
                return False
            core.stop_sequences([(rid, i) for i in indices or range(len(children))])
            return True
        try:
            found = await self.engine.call_in_engine(stop)
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine dead: {e}")
        return pb.AbortResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return self.state.health()
