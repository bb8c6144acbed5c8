"""KV transfer within one host by a one-sided read: the decode process maps the prefill's cache.

    decode worker (IpcKVClient)                          prefill worker (IpcKVServer)
    peers[address] = control socket + mapping            tcp listener (tcp.py), one task per client
      connect + Hello{layout} ------------------------>  check layout, Hello{layout}
                    <--------------------------------  Mapping{host_id, kind, regions}
      map the regions ONCE (ipc_mapping.py: CUDA IPC handles -> device pointers that read the
      peer GPU by P2P; a memfd -> the same host pages) and keep them while the peer lives
      PullRequest{lease, offset, n, 1, timeout} ------>  resolve the lease
                    <--------------------------------  PullSource{src_block_ids, valid_s} | Error
      ONE copy kernel over all layers: dst blocks <- the peer's src blocks, read through the
      mapping (no staging, no send/recv), then wait for it
      [copy ended later than valid_s after the request, or valid_s unknown:]
      PullDone{lease} -------------------------------->  is the lease still held?
                    <--------------------------------  PullDone | Error
      then the decode worker releases the lease as for every transport (connector.py)

Why the lease check: a lease pins its blocks until the decode releases it (after the pull) or
it EXPIRES, and it may expire after the server answered, while the client still reads; the
prefill could then reuse the blocks under the copy. The server announces how long the lease
still holds (valid_s, from the worker's lease table; `lease_remaining`): a copy that ended
within valid_s of the request (minus a margin) read pinned blocks. Otherwise (a slow copy, or a
server without expiry information: tensor-parallel ranks > 0, tests) the client asks: a lease
still held after the copy was held throughout (a lease never comes back).

The server only answers headers; the bytes move in the client's copy (CUDA: the copy_blocks
Triton kernel with src and dst ids, one program per (layer x K/V, block pair), reading the
peer's memory with vector loads; without Triton and on CPU, or for a tensor-parallel re-shard,
the peer's blocks are gathered into a staging buffer and scattered by the pull's copier).

Cheap control: the client runs a whole pull in one worker thread with a blocking socket
(TCP_NODELAY, waits bounded in the kernel by SO_RCVTIMEO): request, copy, wait (and PullDone)
without an event-loop hop between them; the server answers on its event loop, where the lease
resolver lives. Pulls to one server take turns on its one connection (a copy saturates the link
anyway); pulls to different servers run at once.

Both ends must run on one host (the boot ids are compared) and, on CPU, in one pid namespace
(host_shm.py); otherwise, or when the GPUs have no peer access, mapping fails with
KVTransferError (the decode recomputes) and an error log line. No fallback to another path.

Failure: every socket wait is bounded by the pull's deadline. A prefill process that dies
during a copy leaves its memory mapped here until the mapping is dropped, so the copy
completes; a pull that needs PullDone then fails on the closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

import torch

from pdserve.common.kv_transfer import host_shm, ipc_mapping, wire
from pdserve.common.kv_transfer.base import (KVClient, KVLayout, KVTransferError, check_block_ids,
                                             split_address)
from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer, stacked_view
from pdserve.common.kv_transfer.pipeline import PullRefused
from pdserve.common.kv_transfer.tcp import TcpKVServer, accept_hello

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # a new peer: connect, Hello, Mapping and mapping its memory
LEASE_MARGIN_S = 0.005  # a copy must end this long before the lease's announced expiry to skip PullDone
_TIMEVAL = struct.Struct("@ll")  # struct timeval {tv_sec, tv_usec}


class IpcKVServer(TcpKVServer):
    """Answers pulls with source block ids; clients read the blocks through their own mapping.

    The cache must be mappable: CUDA memory, or CPU memory from host_shm.shared_zeros.
    """

    scheme = "ipc"

    def __init__(self, kv_caches, resolve_lease, host: str = "127.0.0.1", port: int = 0, kv_heads=None,
                 lease_remaining: Callable[[str], float | None] | None = None):
        """lease_remaining(lease_id): seconds until the lease expires (None: unknown), from any
        thread; with it a client whose copy ends sooner needs no PullDone check (module doc)."""
        super().__init__(kv_caches, resolve_lease, host, port, max_concurrent_transfers=1, kv_heads=kv_heads)
        self.lease_remaining = lease_remaining
        self._exported = ipc_mapping.exported_tensors(self._copier.kv_caches)  # uint8 views for fp8
        self._kind = "cuda" if self._copier.device.type == "cuda" else "host"
        if self._kind == "host" and any(host_shm.host_export(t) is None for t in self._exported):
            raise ValueError("the ipc KV transport needs the CPU KV cache in shared memory "
                             "(host_shm.shared_zeros; a worker allocates it so with --kv-transport ipc)")
        self._host_id = host_shm.host_id()

    async def _serve_connection(self, connection, peer: str) -> None:
        try:
            if not await accept_hello(connection, self.layout, peer):
                return
            await connection.send_header(ipc_mapping.export(self._exported, self._kind, self._host_id))
            served = None  # (request, source block ids) of the last pull answered here
            while True:
                # An idle connection waits here, without deadline, for its next pull (or the
                # check of the last one).
                message = await connection.recv_header()
                if isinstance(message, wire.PullDone):
                    await self._check_done(connection, message, served, peer)
                    served = None
                else:
                    served = await self._serve_pull(
                        connection, wire.expect(message, wire.PullRequest, f"client {peer}"))
        except (ConnectionError, OSError, TimeoutError, KVTransferError) as e:
            logger.debug("ipc KV client %s disconnected: %s", peer, e)
        finally:
            connection.close()

    async def _serve_pull(self, connection, request: wire.PullRequest):
        """Answers the source blocks (or an Error); returns what a PullDone may then check."""
        start = time.perf_counter()
        try:
            src_block_ids = await self._resolve(request)
        except KVTransferError as e:
            self.num_failures += 1
            await connection.send_header(wire.Error(str(e)))
            return None
        valid_s = None if self.lease_remaining is None else self.lease_remaining(request.lease_id)
        await connection.send_header(wire.PullSource(src_block_ids, valid_s))
        self.record(self._copier.nbytes(len(src_block_ids)), time.perf_counter() - start)
        return request, src_block_ids

    async def _check_done(self, connection, done: wire.PullDone, served, peer: str) -> None:
        """Echoes PullDone while the lease still holds the blocks just served, else an Error."""
        if served is None or done.lease_id != served[0].lease_id:
            raise KVTransferError(f"client {peer} finished lease {done.lease_id!r}, which it did not "
                                  f"just pull here")
        request, src_block_ids = served
        try:
            held = await self._resolve(request) == src_block_ids
        except KVTransferError:
            held = False
        if not held:
            self.num_failures += 1
            await connection.send_header(wire.Error(
                f"lease {request.lease_id!r} was released or expired while the client copied its "
                f"blocks: they may have been reused"))
            return
        await connection.send_header(done)

    async def _resolve(self, request: wire.PullRequest) -> list[int]:
        try:
            return await self.src_block_ids_for(request.lease_id, request.src_block_offset,
                                                request.num_blocks)
        except KVTransferError:
            raise
        except Exception as e:  # a bug in the worker's resolve_lease: tell the client, keep serving
            logger.exception("resolve_lease(%r) raised", request.lease_id)
            raise KVTransferError(f"resolve_lease({request.lease_id!r}) raised {type(e).__name__}: {e}") from e


class _Peer:
    """One server as a client sees it: a blocking control socket (used by one thread at a time)
    and the mapping of the server's cache, kept until the connection drops."""

    def __init__(self, address: str, sock: socket.socket, layers: list[torch.Tensor], layout: KVLayout,
                 phases):
        self.address = address
        self.sock = sock
        self.layers = layers  # the server's [2, N, bs, H, D] per layer, mapped here
        self.stacked = stacked_view(layers)  # [L, 2, N, bs, H, D] when the server's cache is one tensor
        self.layout = layout  # the server's (num_blocks: its pool)
        self.source = BlockCopier(layers, layout, phases)  # staged path: gathers out of the mapping
        self.staging = StagingBuffer(layers[0].device, host_mirror=False)

    def is_alive(self) -> bool:
        """True unless the server closed this idle connection (or sent bytes nobody asked for)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()
        self.layers, self.stacked, self.source, self.staging = [], None, None, None

    def exchange(self, message: wire.Message, deadline: float) -> wire.Message:
        """Sends a header and returns the answer; BlockingIOError once deadline passes."""
        send_header(self.sock, message)
        limit_waits(self.sock, deadline)
        return recv_header(self.sock)

    def pull(self, lease_id: str, dst_block_ids: list[int], src_block_offset: int, deadline: float,
             copier: BlockCopier, direct: bool) -> int:
        peer = f"KV server {self.address}"
        request = wire.PullRequest(lease_id, src_block_offset, len(dst_block_ids), 1 if dst_block_ids else 0,
                                   timeout_s=max(deadline - time.perf_counter(), 1e-3))
        asked = time.perf_counter()  # before the server answered: its lease expiry is later than asked + valid_s
        reply = self.exchange(request, deadline)
        copier.phases.request_s += time.perf_counter() - asked
        if isinstance(reply, wire.Error):
            raise PullRefused(f"{peer}: {reply.message}")
        source = wire.expect(reply, wire.PullSource, peer)
        src_block_ids = source.block_ids
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError(f"{peer} answered {len(src_block_ids)} source blocks for "
                                  f"{len(dst_block_ids)} destination blocks")
        try:
            check_block_ids(src_block_ids, self.layout.num_blocks, f"{peer}'s source blocks")
        except ValueError as e:
            raise KVTransferError(str(e)) from None
        if not dst_block_ids:
            return 0
        if direct:
            self._copy_direct(src_block_ids, dst_block_ids, copier)
        else:
            layers = range(self.layout.num_layers)
            self.source.gather(src_block_ids, self.staging, layers)
            copier.scatter(dst_block_ids, self.staging, layers)
        if source.valid_s is not None and time.perf_counter() - asked < source.valid_s - LEASE_MARGIN_S:
            return copier.nbytes(len(dst_block_ids))  # the lease held the blocks until after the copy
        start = time.perf_counter()
        answer = self.exchange(wire.PullDone(lease_id), deadline)
        copier.phases.wire_s += time.perf_counter() - start
        if isinstance(answer, wire.Error):
            raise PullRefused(f"{peer}: {answer.message}")
        if wire.expect(answer, wire.PullDone, peer).lease_id != lease_id:
            raise KVTransferError(f"{peer} confirmed lease {answer.lease_id!r}, not {lease_id!r}")
        return copier.nbytes(len(dst_block_ids))

    def _copy_direct(self, src_block_ids: list[int], dst_block_ids: list[int], copier: BlockCopier) -> None:
        """ONE copy_blocks launch (per layer when either cache is not one tensor), timed and
        waited for by the copier (its side stream, an event after the kernel)."""
        from pdserve.common.kv_transfer.blocks import _rows
        from pdserve.kernels.copy_blocks import copy_blocks

        if self.stacked is not None and copier.stacked is not None:
            pairs = [(self.stacked, copier.stacked)]
        else:
            pairs = [(src[None], dst[None]) for src, dst in zip(self.layers, copier.kv_caches)]
        num = len(src_block_ids)
        on_device = torch.cuda.device(copier.device) if copier.device.type == "cuda" else contextlib.nullcontext()
        with on_device, copier._copying():
            ids = copier._index(src_block_ids + dst_block_ids)  # one host-to-device copy for both
            src_index, dst_index = ids[:num], ids[num:]
            for src, dst in pairs:
                copy_blocks(_rows(src), _rows(dst), src_index, dst_index)


def limit_waits(sock: socket.socket, deadline: float) -> None:
    """Bounds the blocking socket's receives by deadline (a time.perf_counter() value) in the
    kernel (SO_RCVTIMEO; a receive past it fails with EAGAIN, a BlockingIOError). Python's own
    socket timeout would poll before every call: ~40 us more per round trip on the dev VM."""
    seconds = max(deadline - time.perf_counter(), 1e-3)  # 0 would mean "no limit"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6)))


def send_header(sock: socket.socket, message: wire.Message) -> None:
    data = wire.encode(message)
    sock.sendall(wire.LENGTH_PREFIX.pack(len(data)) + data)


def recv_header(sock: socket.socket) -> wire.Message:
    (length,) = wire.LENGTH_PREFIX.unpack(_recv_exactly(sock, wire.LENGTH_PREFIX.size))
    if length > wire.MAX_HEADER_BYTES:
        raise KVTransferError(f"KV peer announced a {length}-byte header; the limit is "
                              f"{wire.MAX_HEADER_BYTES}: not a pdserve KV connection?")
    return wire.decode(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytearray:
    data = bytearray(nbytes)
    view = memoryview(data)
    received = 0
    while received < nbytes:
        n = sock.recv_into(view[received:])
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {received} of {nbytes} bytes")
        received += n
    return data


class IpcKVClient(KVClient):
    """Pulls by reading a same-host server's cache through a mapping, one peer per address.

    connect_timeout_s bounds a new peer's connection, handshake and mapping (within the pull's
    deadline).
    """

    scheme = "ipc"

    def __init__(self, kv_caches, connect_timeout_s: float = CONNECT_TIMEOUT_S, kv_heads=None,
                 kernel: str | None = None):
        """kernel: BlockCopier's ("triton" on CPU runs the direct copy under TRITON_INTERPRET=1,
        for tests; default: triton on CUDA where it imports)."""
        super().__init__(kv_caches, kv_heads)
        if connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {connect_timeout_s}")
        self.connect_timeout_s = connect_timeout_s
        self._copier = BlockCopier(self.kv_caches, self.layout, self.phases, kernel=kernel)
        self._kind = "cuda" if self._copier.device.type == "cuda" else "host"
        self._host_id = host_shm.host_id()
        # per (address, the layout expected there): a tensor-parallel client pulls other shards
        self._peers: dict[tuple[str, KVLayout], _Peer] = {}
        self._turns: dict[tuple[str, KVLayout], asyncio.Lock] = {}
        self._closed = False

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline, copier) -> int:
        if self._closed:
            raise RuntimeError("IpcKVClient is closed")
        split_address(address, self.scheme)  # ValueError for another scheme or form
        key = (address, copier.layout)
        async with self._turns.setdefault(key, asyncio.Lock()):
            peer = self._peers.pop(key, None)
            if peer is not None and not peer.is_alive():
                peer.close()  # the server went away while the peer was idle
                peer = None
            work = asyncio.get_running_loop().run_in_executor(
                None, self._pull_blocking, peer, address, lease_id, dst_block_ids, src_block_offset,
                deadline, copier)
            try:
                peer, outcome = await asyncio.shield(work)
            except asyncio.CancelledError:
                # Never give the destination blocks back while a copy may still write them;
                # the thread's socket waits end by the deadline.
                await asyncio.wait([work])
                peer, _ = work.result()
                self._keep(key, peer)
                raise
            self._keep(key, peer)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    def _keep(self, key, peer: _Peer | None) -> None:
        if peer is None:
            return
        if self._closed:
            peer.close()
        else:
            self._peers[key] = peer

    def _pull_blocking(self, peer: _Peer | None, address: str, lease_id: str, dst_block_ids: list[int],
                       src_block_offset: int, deadline: float, copier: BlockCopier):
        """A worker thread's whole pull: (the peer to keep or None, the bytes or the exception)."""
        try:
            if peer is None:
                peer = self._connect(address, copier.layout, deadline)
            direct = copier is self._copier and copier.kernel == "triton"
            return peer, peer.pull(lease_id, dst_block_ids, src_block_offset, deadline, copier, direct)
        except PullRefused as e:
            return peer, e  # the connection is still in step
        except KVTransferError as e:
            error = e
        except BlockingIOError:  # a receive ran into the deadline (limit_waits)
            error = KVTransferError(f"KV server {address} did not answer the pull of lease {lease_id!r} "
                                    f"before its deadline")
        except OSError as e:  # ConnectionError included
            error = KVTransferError(f"KV server {address} failed during pull of lease {lease_id!r}: "
                                    f"{type(e).__name__}: {e}")
        except BaseException as e:
            error = e
        if peer is not None:
            peer.close()
        return None, error

    def _connect(self, address: str, layout: KVLayout, deadline: float) -> _Peer:
        host, port = split_address(address, self.scheme)
        deadline = min(deadline, time.perf_counter() + self.connect_timeout_s)
        try:
            sock = socket.create_connection((host, port), timeout=max(deadline - time.perf_counter(), 1e-3))
        except OSError as e:
            raise KVTransferError(f"cannot connect to KV server {address}: {e}") from e
        sock.settimeout(None)  # blocking: every wait is bounded by limit_waits instead
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # headers are small: a send blocks only on a peer that stopped reading with a full buffer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(int(self.connect_timeout_s), 0))
        try:
            peer = f"KV server {address}"
            send_header(sock, wire.Hello(wire.PROTOCOL_VERSION, layout))
            limit_waits(sock, deadline)
            hello = wire.expect(recv_header(sock), wire.Hello, peer)
            wire.check_hello(hello, layout, peer)
            mapping = wire.expect(recv_header(sock), wire.Mapping, peer)
            if mapping.host_id != self._host_id:
                raise KVTransferError(f"{peer} runs on another host (boot id {mapping.host_id}, here "
                                      f"{self._host_id}): the ipc KV transport works only between "
                                      f"processes of one host; use tcp, ucx or nccl across hosts")
            if mapping.kind != self._kind:
                raise KVTransferError(f"{peer} holds its KV cache in {mapping.kind} memory, this worker in "
                                      f"{self._kind} memory: ipc needs both on GPUs or both on CPU")
            try:
                layers = ipc_mapping.mapped_layers(mapping, hello.layout, self._copier.device)
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
                raise KVTransferError(f"cannot map the KV cache of {peer} ({mapping.kind} memory): "
                                      f"{type(e).__name__}: {e} (ipc needs one host, one pid namespace "
                                      f"on CPU, GPUs with peer access on CUDA)") from e
        except BaseException as e:
            sock.close()
            if isinstance(e, KVTransferError):
                logger.error("ipc KV peer %s unusable, its pulls fail (decode recomputes): %s", address, e)
            raise
        return _Peer(address, sock, layers, hello.layout, self.phases)

    async def close(self) -> None:
        self._closed = True
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


SERVER = IpcKVServer
CLIENT = IpcKVClient
