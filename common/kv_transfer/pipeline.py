"""One pull on one connection, shared by the tcp, ucx and nccl backends.

    client: pull_on()                                 server: serve_pull()
      PullRequest{n, num_chunks} ------------------>    resolve lease, check length
      [early_receives: post recv of every chunk]
                 <---------------------------------     PullReply{nbytes, num_chunks} | Error
                                                        gather chunk 0
      recv chunk 0       <---- chunk 0 ----             send chunk 0  || gather chunk 1
      recv chunk 1       <---- chunk 1 ----             send chunk 1  || gather chunk 2
        || scatter chunk 0
      ...                                               ...
      scatter last chunk

Chunks are layer ranges (blocks.py): the client picks how many (one when the payload stays in
GPU memory, so a GPU pull is one gather, one message and one scatter) and asks for them in the
request, and the gather of the first chunk runs while the reply travels. Copies run in worker
threads, so a copy overlaps the transfer of the neighbouring chunk. A backend's connection
supplies four awaitables (send/recv of a header, send/recv of a uint8 tensor) and says whether
its payload receives can be posted before the reply (`early_receives`, ucx: a tagged receive
waits for its message, so the payload never waits for the client to see the reply; a refusing
server then sends one empty payload message per chunk to complete them). Each end adds the
time of its phases to the copier's PullPhases (base.py).

Staging buffers come from a StagingPool per server or client, one buffer per transfer in
flight (not per connection): on GPU a 2048-token Llama-3-8B handoff stages 256 MiB, so the
pool's size bounds the memory held, at most size x the largest pull. Buffers are reused
(last freed, first taken), which keeps UCX's cuda_ipc mappings of them valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import torch

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import KVServer, KVTransferError
from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer

logger = logging.getLogger(__name__)

SEND_SLACK_S = 1.0  # the server keeps sending this long past the client's budget


class StagingPool:
    """At most `size` staging buffers, one per transfer in flight; each keeps its capacity."""

    def __init__(self, device: torch.device, host_mirror: bool, size: int):
        if size < 1:
            raise ValueError(f"a staging pool needs at least one buffer, got size={size}")
        self._device = device
        self._host_mirror = host_mirror
        self._free = [StagingBuffer(device, host_mirror) for _ in range(size)]
        self._available = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def buffer(self):
        async with self._available:
            staging = self._free.pop()
            clean = False
            try:
                yield staging
                clean = True
            finally:
                # After a failure a transport may still write into the buffer (an aborted ucx
                # receive completes late): give it up and put a fresh one in its place.
                self._free.append(staging if clean else
                                  StagingBuffer(self._device, self._host_mirror))


class Destination:
    """A pull's destination blocks, the caller's until it gives up the pull (deadline, a
    cancelled load): from then on the pull may still receive (its connection stays in step) but
    writes nothing more into them; `give_up` returns once a write already begun has ended."""

    def __init__(self):
        self.given_up = False
        self.writing: asyncio.Future | None = None  # the scatter in flight

    async def give_up(self) -> None:
        self.given_up = True
        if self.writing is not None:
            await asyncio.wait([self.writing])


class PullRefused(KVTransferError):
    """The server answered the pull with an Error header; the connection stays in step."""


class Connection(Protocol):
    early_receives: bool  # payload receives are posted with the request (see the module doc)

    async def send_header(self, message: wire.Message) -> None: ...

    async def recv_header(self) -> wire.Message: ...

    async def send_payload(self, payload: torch.Tensor) -> None: ...

    async def recv_payload(self, buffer: torch.Tensor) -> None: ...


async def serve_pull(server: KVServer, copier: BlockCopier, pool: StagingPool,
                     connection: Connection, request: wire.PullRequest) -> None:
    """Answers one PullRequest: an Error header, or the reply header and the blocks."""
    start = time.perf_counter()
    try:
        src_block_ids = await server.src_block_ids_for(request.lease_id, request.src_block_offset,
                                                       request.num_blocks)
        if src_block_ids:
            copier.layer_chunks(request.num_chunks)  # ValueError unless in [1, num_layers]
    except (KVTransferError, ValueError) as e:
        server.num_failures += 1
        await refuse(connection, request, str(e))
        return
    except Exception as e:  # a bug in the worker's resolve_lease: tell the client, keep serving
        logger.exception("resolve_lease(%r) raised", request.lease_id)
        server.num_failures += 1
        await refuse(connection, request, f"resolve_lease({request.lease_id!r}) raised "
                                          f"{type(e).__name__}: {e}")
        return
    nbytes = copier.nbytes(len(src_block_ids))
    try:
        await asyncio.wait_for(_send_blocks(copier, pool, connection, src_block_ids, nbytes,
                                            request.num_chunks),
                               timeout=request.timeout_s + SEND_SLACK_S)
    except BaseException:
        server.num_failures += 1
        raise
    server.record(nbytes, time.perf_counter() - start)


async def refuse(connection: Connection, request: wire.PullRequest, message: str) -> None:
    """Answers a pull with an Error header (and completes the client's posted receives)."""
    await connection.send_header(wire.Error(message))
    if connection.early_receives:
        empty = torch.empty(0, dtype=torch.uint8)
        for _ in range(request.num_chunks):
            await connection.send_payload(empty)


async def _send_blocks(copier: BlockCopier, pool: StagingPool, connection: Connection,
                       block_ids: list[int], nbytes: int, num_chunks: int) -> None:
    if not block_ids:
        await connection.send_header(wire.PullReply(nbytes, num_chunks=0))
        return
    async with pool.buffer() as staging:
        await _send_chunks(copier, staging, connection, block_ids, nbytes, num_chunks)


async def _send_chunks(copier: BlockCopier, staging: StagingBuffer, connection: Connection,
                       block_ids: list[int], nbytes: int, num_chunks: int) -> None:
    chunks = copier.layer_chunks(num_chunks)
    # The first gather runs while the reply header travels.
    gathered = asyncio.ensure_future(
        asyncio.to_thread(copier.gather, block_ids, staging, chunks[0]))
    try:
        await connection.send_header(wire.PullReply(nbytes, num_chunks))
        for i in range(len(chunks)):
            payload = await gathered
            if i + 1 < len(chunks):
                gathered = asyncio.ensure_future(asyncio.to_thread(
                    copier.gather, block_ids, staging, chunks[i + 1]))
            start = time.perf_counter()
            await connection.send_payload(payload)
            copier.phases.wire_s += time.perf_counter() - start
            copier.phases.payload_messages += 1
    finally:
        await asyncio.wait([gathered])  # a copy thread cannot be interrupted; let it finish


async def pull_on(connection: Connection, copier: BlockCopier, pool: StagingPool, peer: str,
                  lease_id: str, dst_block_ids: list[int], src_block_offset: int,
                  deadline: float, destination: Destination | None = None) -> int:
    """Runs one pull on an open connection; returns the bytes moved. `destination`: where the
    caller may give the pull up while it runs on (the blocks are then left untouched).

    Raises PullRefused when the server refuses (unknown lease, length mismatch): the connection
    can be reused. Other KVTransferErrors and the backend's transport errors leave the
    connection out of step: close it.
    """
    if not dst_block_ids:
        return await _pull_nothing(connection, copier, peer, lease_id, src_block_offset,
                                   deadline)
    async with pool.buffer() as staging:
        num_chunks = copier.num_chunks(len(dst_block_ids), staging.payload_on_device)
        chunks = copier.layer_chunks(num_chunks)
        request = wire.PullRequest(lease_id, src_block_offset, len(dst_block_ids), num_chunks,
                                   timeout_s=max(deadline - time.perf_counter(), 1e-3))
        views = [copier.receive_view(len(dst_block_ids), staging, layers) for layers in chunks]
        start = time.perf_counter()
        sent = asyncio.ensure_future(connection.send_header(request))
        posted = [asyncio.ensure_future(connection.recv_payload(view))
                  for view in (views if connection.early_receives else [])]
        try:
            reply = await _reply(connection, sent)
            copier.phases.request_s += time.perf_counter() - start
            if isinstance(reply, wire.Error):
                if posted:  # the server completes them with empty messages
                    await asyncio.gather(*posted)
                raise PullRefused(f"{peer}: {reply.message}")
            reply = wire.expect(reply, wire.PullReply, peer)
            _check_reply(reply, copier.nbytes(len(dst_block_ids)), num_chunks, peer)
            await _receive_chunks(copier, staging, connection, dst_block_ids, chunks, views,
                                  posted, destination)
        finally:
            pending = [task for task in posted if not task.done()]
            for task in pending:
                task.cancel()  # the caller aborts the connection: the receives fail anyway
            if pending:
                await asyncio.wait(pending)
    return copier.nbytes(len(dst_block_ids))


async def _pull_nothing(connection: Connection, copier: BlockCopier, peer: str, lease_id: str,
                        src_block_offset: int, deadline: float) -> int:
    """A pull of no blocks: the server still checks the lease and the offset."""
    request = wire.PullRequest(lease_id, src_block_offset, 0, 0,
                               timeout_s=max(deadline - time.perf_counter(), 1e-3))
    start = time.perf_counter()
    reply = await _reply(connection, asyncio.ensure_future(connection.send_header(request)))
    copier.phases.request_s += time.perf_counter() - start
    if isinstance(reply, wire.Error):
        raise PullRefused(f"{peer}: {reply.message}")
    _check_reply(wire.expect(reply, wire.PullReply, peer), 0, 0, peer)
    return 0


async def _reply(connection: Connection, sent: asyncio.Future) -> wire.Message:
    """The server's reply header, awaited together with the send of the request.

    A ucx send completes only after a round trip through ucxx's notifier thread, which would
    otherwise delay the reply by as much.
    """
    try:
        reply = await connection.recv_header()
    except BaseException:
        sent.cancel()  # a send stuck on a dead peer must not outlive the deadline
        await asyncio.wait([sent])
        raise
    await sent
    return reply


def _check_reply(reply: wire.PullReply, nbytes: int, num_chunks: int, peer: str) -> None:
    if reply.nbytes != nbytes:
        raise KVTransferError(f"{peer} announced {reply.nbytes} bytes, expected {nbytes}")
    if reply.num_chunks != num_chunks:
        raise KVTransferError(f"{peer} announced {reply.num_chunks} chunks, the client asked "
                              f"for {num_chunks}")


async def _receive_chunks(copier: BlockCopier, staging: StagingBuffer, connection: Connection,
                          block_ids: list[int], chunks: list[range], views: list[torch.Tensor],
                          posted: list[asyncio.Future], destination: Destination | None) -> None:
    scattered: asyncio.Future | None = None
    try:
        for i, layers in enumerate(chunks):
            start = time.perf_counter()
            if posted:
                await posted[i]
            else:
                await connection.recv_payload(views[i])
            copier.phases.wire_s += time.perf_counter() - start
            copier.phases.payload_messages += 1
            if scattered is not None:
                await scattered
            if destination is not None and destination.given_up:
                scattered = None  # receive the rest (the connection stays in step), write nothing
                continue
            scattered = asyncio.ensure_future(
                asyncio.to_thread(copier.scatter, block_ids, staging, layers))
            if destination is not None:
                destination.writing = scattered
        if scattered is not None:
            await scattered
    finally:
        # Never return (or fail) while a thread still writes into the destination blocks:
        # the caller may hand them to another request right after.
        if scattered is not None:
            await asyncio.wait([scattered])
