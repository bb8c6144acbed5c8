"""The decode worker's LeaseReleaser reuses one gRPC channel per prefill worker (a channel per
release cost a TCP + HTTP/2 handshake per request on both workers), still reaches a prefill
worker that restarted on the same address, and closes its channels."""

from __future__ import annotations

import asyncio

import grpc

from pdserve.common.kv_transfer.connector import PullSpec
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services.decode.server import LeaseReleaser


class CountingPrefill(pb_grpc.PrefillServicer):
    def __init__(self):
        self.released: list[str] = []

    async def ReleaseLease(self, request, context):
        self.released.append(request.lease_id)
        return pb.ReleaseLeaseResponse(released=True)


async def start(servicer, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_PrefillServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def spec(port: int, lease_id: str) -> PullSpec:
    return PullSpec(transport="tcp", address="tcp://127.0.0.1:1", lease_id=lease_id, num_tokens=1,
                    block_size=16, control_address=f"127.0.0.1:{port}")


def test_releases_share_one_channel_and_survive_a_restart():
    async def main():
        first = CountingPrefill()
        server, port = await start(first)
        releaser = LeaseReleaser()
        try:
            await asyncio.gather(*(releaser(spec(port, f"l{i}")) for i in range(20)))
            assert sorted(first.released) == sorted(f"l{i}" for i in range(20))
            assert len(releaser._channels) == 1
            channel = releaser._channels[f"127.0.0.1:{port}"]
            await server.stop(grace=None)
            await releaser(spec(port, "lost"))  # the worker is gone: no error (the lease expires there)
            second = CountingPrefill()
            server, _ = await start(second, port)  # back on the same address
            for _ in range(50):  # the cached channel reconnects
                await releaser(spec(port, "again"))
                if second.released:
                    break
                await asyncio.sleep(0.1)
            assert second.released and releaser._channels[f"127.0.0.1:{port}"] is channel
        finally:
            await releaser.close()
            await server.stop(grace=None)
        assert releaser._channels == {}
    asyncio.run(main())
