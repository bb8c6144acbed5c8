"""DrainedStream: a gRPC response stream read ahead, taken as batches (the router's Decode streams).

    reader task:  async for message in call --> asyncio.Queue (one item per message; then END or
                                                 the stream's error)
    consumer:     async for batch in DrainedStream(call): batch = every message that arrived since
                  the last batch was taken (at least one); the error, if any, after the messages
                  before it

Why (issue 11, docs/decisions/load-1p1d.md): decode sends one DecodeChunk per engine step and
request, so at 100 req/s x 128 tokens the router receives ~13k messages/s on one event loop.
When it falls behind, the messages wait in gRPC's buffers and were then handled one at a time:
one RequestOutput, one SSE event and one socket write per token, a burst of them per stream.
Taking what has queued as one batch makes the router's work per batch, not per token, exactly
when it lags; a router that keeps up still gets batches of one. Torch-free.
"""

from __future__ import annotations

import asyncio

from pdserve.common.queued import take_queued

_END = object()


class DrainedStream:
    def __init__(self, call):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = None  # END or an error found behind a batch: returned / raised next
        self._task = asyncio.ensure_future(self._read(call))

    async def _read(self, call) -> None:
        try:
            async for message in call:
                self._queue.put_nowait(message)
        except Exception as e:  # grpc.aio.AioRpcError: raised to the consumer in order
            self._queue.put_nowait(e)
            return
        self._queue.put_nowait(_END)

    def __aiter__(self) -> "DrainedStream":
        return self

    async def __anext__(self) -> list:
        item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
        if item is _END:
            self._held = _END
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        batch, self._held = take_queued(self._queue, item, lambda x: x is _END or isinstance(x, Exception))
        return batch

    def interrupt(self, error: Exception) -> None:
        """The consumer raises `error` once it has taken the messages that came before it."""
        self._queue.put_nowait(error)

    def close(self) -> None:
        """Stop reading (the caller cancels the call itself)."""
        self._task.cancel()
