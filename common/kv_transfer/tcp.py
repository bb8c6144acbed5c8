"""KV transfer over plain TCP sockets driven by the asyncio event loop.

    decode worker (TcpKVClient)                          prefill worker (TcpKVServer)
    pool[address] -> idle connections                    accept loop -> one task per connection
      connect + Hello{layout}  ----------------------->  check layout, Hello{layout} | Error
      PullRequest{lease, offset, n, chunks, timeout} -> resolve_lease, gather into staging
      recv_into(staging) <---- PullReply{nbytes, num_chunks} + the blocks, in layer chunks
      scatter staging -> dst_block_ids                   (pipeline.py overlaps copy and wire)

Headers are length-prefixed JSON (wire.py). The payload goes from the server's staging buffer
straight to the socket (loop.sock_sendall of a memoryview, no copy) and lands in the client's
staging buffer (loop.sock_recv_into, no copy). On CUDA both ends stage through pinned host
memory. Staging buffers come from a pool per server/client (pipeline.StagingPool).

A connection carries one pull at a time and goes back to its address's pool after a clean
reply; at most `max_connections_per_peer` pulls to one address run at once, the rest wait
(inside their deadline). An idle pooled connection whose peer went away is detected with
a non-blocking peek before reuse, so a restarted server costs no failed pull.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import torch

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import (KVClient, KVLayout, KVServer, KVTransferError,
                                             split_address)
from pdserve.common.kv_transfer.blocks import BlockCopier
from pdserve.common.kv_transfer.pipeline import PullRefused, StagingPool, pull_on, serve_pull

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # a connecting client must say Hello within this


class SocketConnection:
    """One TCP socket speaking the KV wire protocol (also the nccl backend's control channel)."""

    early_receives = False  # a byte stream: the payload can only be read after the reply

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._prefix = bytearray(wire.LENGTH_PREFIX.size)

    async def send_header(self, message: wire.Message) -> None:
        data = wire.encode(message)
        await self._loop.sock_sendall(self.sock, wire.LENGTH_PREFIX.pack(len(data)) + data)

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self._loop.sock_sendall(self.sock, memoryview(payload.numpy()))

    async def recv_header(self) -> wire.Message:
        await self.recv_into(memoryview(self._prefix))
        (length,) = wire.LENGTH_PREFIX.unpack(self._prefix)
        if length > wire.MAX_HEADER_BYTES:
            raise KVTransferError(f"KV peer announced a {length}-byte header; the limit is "
                                  f"{wire.MAX_HEADER_BYTES}: not a pdserve KV connection?")
        data = bytearray(length)
        await self.recv_into(memoryview(data))
        return wire.decode(data)

    async def recv_payload(self, buffer: torch.Tensor) -> None:
        await self.recv_into(memoryview(buffer.numpy()))

    async def recv_into(self, view: memoryview) -> None:
        """Fills view completely; ConnectionError if the peer closes first."""
        view = view.cast("B")
        received = 0
        while received < len(view):
            n = await self._loop.sock_recv_into(self.sock, view[received:])
            if n == 0:
                raise ConnectionError(f"peer closed the connection after {received} of "
                                      f"{len(view)} bytes")
            received += n

    def is_alive(self) -> bool:
        """True unless the peer closed or reset this idle connection (or sent stray bytes)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: the peer is still there and silent, as it should be
        except OSError:
            return False
        return False  # end of stream (b"") or bytes nobody asked for

    def close(self) -> None:
        self.sock.close()


async def accept_hello(connection: SocketConnection, layout: KVLayout, peer: str) -> bool:
    """Server side of the handshake: True once the client's Hello is answered with ours; False
    (after an Error header) when its layout or version differs."""
    hello = await asyncio.wait_for(connection.recv_header(), HANDSHAKE_TIMEOUT_S)
    try:
        wire.check_hello(wire.expect(hello, wire.Hello, f"client {peer}"), layout,
                         f"client {peer}")
    except KVTransferError as e:
        await connection.send_header(wire.Error(str(e)))
        logger.warning("refused KV client %s: %s", peer, e)
        return False
    await connection.send_header(wire.Hello(wire.PROTOCOL_VERSION, layout))
    return True


async def open_connection(address: str, host: str, port: int,
                          layout: KVLayout) -> SocketConnection:
    """Client side: connects to a KV server and exchanges Hellos (KVTransferError on mismatch)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    connection = SocketConnection(sock)
    try:
        await loop.sock_connect(sock, sockaddr)
        await connection.send_header(wire.Hello(wire.PROTOCOL_VERSION, layout))
        hello = wire.expect(await connection.recv_header(), wire.Hello, f"KV server {address}")
        wire.check_hello(hello, layout, f"KV server {address}")
    except BaseException:
        connection.close()
        raise
    return connection


class TcpKVServer(KVServer):
    """Serves leased blocks on a TCP port: one task per client connection.

    max_concurrent_transfers bounds the pulls being sent at once (and their staging buffers).
    """

    scheme = "tcp"
    host_mirror = True  # CUDA payloads are staged in pinned host memory for the socket

    def __init__(self, kv_caches, resolve_lease, host: str = "127.0.0.1", port: int = 0,
                 max_concurrent_transfers: int = 4, kv_heads=None):
        super().__init__(kv_caches, resolve_lease, host, port, kv_heads)
        self._copier = BlockCopier(self.kv_caches, self.layout, self.phases)
        self._staging = StagingPool(self._copier.device, host_mirror=self.host_mirror,
                                    size=max_concurrent_transfers)
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._connection_tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        if self._listen_sock is not None:
            raise RuntimeError(f"{type(self).__name__} already serving at {self.address}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listen_sock = socket.create_server((self.host, self.port), family=family,
                                                 backlog=128)
        self._listen_sock.setblocking(False)
        self.port = self._listen_sock.getsockname()[1]
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.address = f"{self.scheme}://{host}:{self.port}"
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self.address

    async def close(self) -> None:
        if self._listen_sock is None:
            return
        self._listen_sock.close()
        self._listen_sock = None
        tasks = [self._accept_task, *self._connection_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(self._listen_sock)
            connection = SocketConnection(sock)
            task = loop.create_task(self._serve_connection(connection, f"{peer[0]}:{peer[1]}"))
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

    async def _serve_connection(self, connection: SocketConnection, peer: str) -> None:
        try:
            if not await accept_hello(connection, self.layout, peer):
                return
            while True:
                # An idle pooled connection waits here, without deadline, for its next pull.
                request = await connection.recv_header()
                await serve_pull(self, self._copier, self._staging, connection,
                                 wire.expect(request, wire.PullRequest, f"client {peer}"))
        except (ConnectionError, OSError, TimeoutError, KVTransferError) as e:
            logger.debug("KV client %s disconnected: %s", peer, e)
        finally:
            connection.close()


class TcpKVClient(KVClient):
    """Pulls blocks over pooled TCP connections, one pool per server address.

    max_connections_per_peer bounds the pulls in flight to one server, max_concurrent_transfers
    those in flight in all (and their staging buffers).
    """

    scheme = "tcp"

    def __init__(self, kv_caches, max_connections_per_peer: int = 4,
                 max_concurrent_transfers: int = 4, kv_heads=None):
        super().__init__(kv_caches, kv_heads)
        if max_connections_per_peer < 1:
            raise ValueError(f"max_connections_per_peer must be >= 1, got "
                             f"{max_connections_per_peer}")
        self.max_connections_per_peer = max_connections_per_peer
        self._copier = BlockCopier(kv_caches, self.layout, self.phases)
        self._staging = StagingPool(self._copier.device, host_mirror=True,
                                    size=max_concurrent_transfers)
        # per (address, the layout expected there): a tensor-parallel client pulls other shards
        self._idle: dict[tuple[str, KVLayout], list[SocketConnection]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._closed = False

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline,
                    copier) -> int:
        if self._closed:
            raise RuntimeError("TcpKVClient is closed")
        host, port = split_address(address, self.scheme)
        slots = self._slots.setdefault(address, asyncio.Semaphore(self.max_connections_per_peer))
        key = (address, copier.layout)
        async with slots:
            connection = self._take_idle(key)
            reusable = False
            try:
                if connection is None:
                    connection = await open_connection(address, host, port, copier.layout)
                nbytes = await pull_on(connection, copier, self._staging,
                                       f"KV server {address}",
                                       lease_id, dst_block_ids, src_block_offset, deadline)
                reusable = True
                return nbytes
            except PullRefused:
                reusable = True  # the stream is still in step after an Error header
                raise
            except (ConnectionError, OSError) as e:
                raise KVTransferError(f"KV server {address} failed during pull of lease "
                                      f"{lease_id!r}: {e}") from e
            finally:
                if connection is not None:
                    if reusable and not self._closed:
                        self._idle.setdefault(key, []).append(connection)
                    else:
                        connection.close()

    def _take_idle(self, key: tuple[str, KVLayout]) -> SocketConnection | None:
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            if connection.is_alive():
                return connection
            connection.close()
        return None

    async def close(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


SERVER = TcpKVServer
CLIENT = TcpKVClient
