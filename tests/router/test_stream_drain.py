"""DrainedStream (services/router/stream_drain.py) over a real grpc.aio server stream on 127.0.0.1:
a consumer that lags takes every message queued meanwhile as one batch, in order; an error
after some messages comes after them; closing stops the reader."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.services.router.stream_drain import DrainedStream

NUM = 40


async def _server(fail_after: int | None):
    async def stream(request: bytes, context):
        for i in range(NUM):
            if fail_after is not None and i == fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode went away")
            yield i.to_bytes(2, "big")
    handler = grpc.method_handlers_generic_handler(
        "t.T", {"S": grpc.unary_stream_rpc_method_handler(stream)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _drain(fail_after: int | None, lag: bool):
    server, port = await _server(fail_after)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/t.T/S")(b"")
            chunks = DrainedStream(call)
            batches, error = [], None
            try:
                async for batch in chunks:
                    batches.append([int.from_bytes(m, "big") for m in batch])
                    if lag and len(batches) == 1:
                        await asyncio.sleep(0.5)  # the server sends the rest meanwhile
            except grpc.aio.AioRpcError as e:
                error = e.code()
            finally:
                chunks.close()
                call.cancel()
            return batches, error
    finally:
        await server.stop(None)


def test_lagging_consumer_takes_queued_messages_as_one_batch():
    batches, error = asyncio.run(_drain(None, lag=True))
    assert error is None
    assert [m for b in batches for m in b] == list(range(NUM))
    assert len(batches) == 2 and len(batches[1]) == NUM - len(batches[0])  # all queued behind the first


@pytest.mark.parametrize("lag", [False, True])
def test_error_comes_after_the_messages_before_it(lag):
    batches, error = asyncio.run(_drain(10, lag))
    assert [m for b in batches for m in b] == list(range(10))
    assert error == grpc.StatusCode.UNAVAILABLE
