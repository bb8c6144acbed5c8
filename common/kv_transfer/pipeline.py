"""One pull on one connection, shared by the tcp and ucx backends.

    client: pull_on()                                 server: serve_pull()
      PullRequest --------------------------------->    resolve lease, check length
                 <---------------------------------     PullReply{nbytes} | Error
                                                        gather chunk 0
      recv chunk 0       <---- chunk 0 ----             send chunk 0  || gather chunk 1
      recv chunk 1       <---- chunk 1 ----             send chunk 1  || gather chunk 2
        || scatter chunk 0
      ...                                               ...
      scatter last chunk

Chunks are the copier's layer_chunks (blocks.py). Copies run in worker threads, so a copy
overlaps the transfer of the neighbouring chunk. A backend's connection supplies four awaitables
(send/recv of a header, send/recv of a uint8 tensor) and its staging buffer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import torch

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import KVServer, KVTransferError
from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer

SEND_SLACK_S = 1.0  # the server keeps sending this long past the client's budget


class PullRefused(KVTransferError):
    """The server answered the pull with an Error header; the connection stays in step."""


class Connection(Protocol):
    staging: StagingBuffer

    async def send_header(self, message: wire.Message) -> None: ...

    async def recv_header(self) -> wire.Message: ...

    async def send_payload(self, payload: torch.Tensor) -> None: ...

    async def recv_payload(self, buffer: torch.Tensor) -> None: ...


async def serve_pull(server: KVServer, copier: BlockCopier, connection: Connection,
                     request: wire.PullRequest) -> None:
    """Answers one PullRequest: an Error header, or the reply header and the blocks."""
    start = time.perf_counter()
    try:
        src_block_ids = server.src_block_ids_for(request.lease_id, request.src_block_offset,
                                                 request.num_blocks)
    except (KVTransferError, ValueError) as e:
        server.num_failures += 1
        await connection.send_header(wire.Error(str(e)))
        return
    nbytes = copier.nbytes(len(src_block_ids))
    try:
        await asyncio.wait_for(_send_blocks(copier, connection, src_block_ids, nbytes),
                               timeout=request.timeout_s + SEND_SLACK_S)
    except BaseException:
        server.num_failures += 1
        raise
    server.record(nbytes, time.perf_counter() - start)


async def _send_blocks(copier: BlockCopier, connection: Connection, block_ids: list[int],
                       nbytes: int) -> None:
    if not block_ids:
        await connection.send_header(wire.PullReply(nbytes))
        return
    chunks = copier.layer_chunks(len(block_ids))
    # The first gather runs while the reply header travels.
    gathered = asyncio.ensure_future(
        asyncio.to_thread(copier.gather, block_ids, connection.staging, chunks[0]))
    try:
        await connection.send_header(wire.PullReply(nbytes))
        for i in range(len(chunks)):
            payload = await gathered
            if i + 1 < len(chunks):
                gathered = asyncio.ensure_future(asyncio.to_thread(
                    copier.gather, block_ids, connection.staging, chunks[i + 1]))
            await connection.send_payload(payload)
    finally:
        await asyncio.wait([gathered])  # a copy thread cannot be interrupted; let it finish


async def pull_on(connection: Connection, copier: BlockCopier, peer: str, lease_id: str,
                  dst_block_ids: list[int], src_block_offset: int,
                  deadline: float) -> int:
    """Runs one pull on an open connection; returns the bytes moved.

    Raises PullRefused when the server refuses (unknown lease, length mismatch): the connection
    can be reused. Other KVTransferErrors and the backend's transport errors leave the
    connection out of step: close it.
    """
    request = wire.PullRequest(lease_id, src_block_offset, len(dst_block_ids),
                               timeout_s=max(deadline - time.perf_counter(), 1e-3))
    # Wait for the send and the reply together: a ucx send completes only after a round trip
    # through ucxx's notifier thread, which would otherwise delay the reply by as much.
    sent = asyncio.ensure_future(connection.send_header(request))
    try:
        reply = await connection.recv_header()
    except BaseException:
        sent.cancel()  # a send stuck on a dead peer must not outlive the deadline
        await asyncio.wait([sent])
        raise
    await sent
    if isinstance(reply, wire.Error):
        raise PullRefused(f"{peer}: {reply.message}")
    reply = wire.expect(reply, wire.PullReply, peer)
    nbytes = copier.nbytes(len(dst_block_ids))
    if reply.nbytes != nbytes:
        raise KVTransferError(f"{peer} announced {reply.nbytes} bytes for "
                              f"{len(dst_block_ids)} blocks, expected {nbytes}")
    if dst_block_ids:
        await _receive_blocks(copier, connection, dst_block_ids)
    return nbytes


async def _receive_blocks(copier: BlockCopier, connection: Connection,
                          block_ids: list[int]) -> None:
    scattered: asyncio.Future | None = None
    try:
        for layers in copier.layer_chunks(len(block_ids)):
            await connection.recv_payload(
                copier.receive_view(len(block_ids), connection.staging, layers))
            if scattered is not None:
                await scattered
            scattered = asyncio.ensure_future(
                asyncio.to_thread(copier.scatter, block_ids, connection.staging, layers))
        await scattered
    finally:
        # Never return (or fail) while a thread still writes into the destination blocks:
        # the caller may hand them to another request right after.
        if scattered is not None:
            await asyncio.wait([scattered])
