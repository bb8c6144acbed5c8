"""KV transfer over UCX (the `ucxx` package): tcp on CPU; cuda_copy / cuda_ipc (and rc) on GPU.

    decode worker (UcxKVClient)                          prefill worker (UcxKVServer)
    pool[address] -> idle endpoints                      ucxx listener -> one handler per endpoint
      create_endpoint + am Hello{layout} ------------->  check layout, am Hello{layout} | Error
      am PullRequest{lease, offset, n, chunks, timeout}  resolve_lease, gather into staging
        + tag recv(staging) posted at once ------->
      <---- am PullReply{nbytes, num_chunks} | Error, then one tag send per chunk
      scatter staging -> dst_block_ids                   (pipeline.py overlaps copy and wire)

Headers travel as UCX active messages (the receiver needs no size); each chunk of the payload
is one tagged message whose size both ends derive from the layout and the chunk count the
client asked for, received straight into a staging buffer from the pool (tag messages of one
endpoint arrive in order). The client posts those receives together with its request, so the
payload's rendezvous never waits for the client to see the reply header; a refusal (Error)
is followed by one empty tagged message per chunk that completes them. Staging lives on the cache's device, so on GPU the payload goes device to
device (cuda_ipc on one host) without touching host memory, as ONE message: every message
costs a rendezvous and ucxx thread hops, far more than cuda_ipc takes to move it. Endpoints
are pooled per address and reused: the first large transfer on a fresh endpoint pays for
protocol setup.

UCX is configured only through environment variables read when its context is created, so
`configure_ucx_env` (the one place that sets them) runs in the constructors, before the lazy
`import ucxx`. ucxx keeps ONE process-wide context whose notifier thread is bound to the event
loop that created it; `_UcxRuntime` counts the live servers/clients, insists that they share
one loop, and resets ucxx when the last one closes (without that, the notifier thread keeps
the process from exiting, and a later event loop, e.g. the next test, would hang).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import time

import torch

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import (KVClient, KVLayout, KVServer, KVTransferError,
                                             split_address)
from pdserve.common.kv_transfer.blocks import BlockCopier
from pdserve.common.kv_transfer.pipeline import PullRefused, StagingPool, pull_on, serve_pull

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # a connecting client must say Hello within this
CLOSE_TIMEOUT_S = 2.0  # close() waits this long for the handlers of aborted endpoints


def configure_ucx_env(on_gpu: bool, net_devices: str | None = None) -> None:
    """Sets UCX defaults; a variable the operator set wins. Call before the ucxx context starts.

    on_gpu: allow the CUDA transports. net_devices: UCX_NET_DEVICES, e.g. "lo" for a server
    that only listens on loopback, "eth0" or "mlx5_0:1" in a cluster; None keeps what is set
    (UCX's default is "all").

    Like os.environ.setdefault, except that a default this function set earlier, in this
    process or in a parent (spawned processes inherit the environment), may be replaced: a
    process that closed its CPU servers may start GPU ones (a test session does). The defaults
    it set are listed in PDSERVE_UCX_DEFAULTS. UCX reads the variables only when the process's
    context is created (_UcxRuntime).
    """
    defaults = {
        # tcp everywhere; on GPU also device copies and CUDA IPC between processes of one host.
        "UCX_TLS": "tcp,cuda_copy,cuda_ipc" if on_gpu else "tcp",
        # Larger tcp segments: 512K moved 256 MB at ~3 GB/s on loopback, the 8K default ~0.8.
        "UCX_TCP_TX_SEG_SIZE": "512K",
        "UCX_TCP_RX_SEG_SIZE": "512K",
        # A restarted prefill worker must be able to bind its fixed port again at once.
        "UCX_TCP_CM_REUSEADDR": "y",
        # Wake waiting coroutines through Python futures; otherwise ucxx spins a core at 100 %.
        "UCXPY_ENABLE_PYTHON_FUTURE": "1",
        # ucxx itself sets UCX_MEMTYPE_CACHE, which this UCX no longer knows and warns about.
        "UCX_WARN_UNUSED_ENV_VARS": "n",
    }
    if net_devices is not None:
        defaults["UCX_NET_DEVICES"] = net_devices
    ours = json.loads(os.environ.get(_DEFAULTS_VARIABLE, "{}"))
    for name, value in defaults.items():
        if name not in os.environ or os.environ[name] == ours.get(name):
            os.environ[name] = value
            ours[name] = value
    os.environ[_DEFAULTS_VARIABLE] = json.dumps(ours, sort_keys=True)


_DEFAULTS_VARIABLE = "PDSERVE_UCX_DEFAULTS"  # JSON {name: value} of what configure_ucx_env set


def _ucxx():
    import ucxx  # imported lazily: configure_ucx_env must have run first

    return ucxx


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _as_ucx_buffer(tensor: torch.Tensor):
    """A uint8 staging tensor as something ucxx can send/receive without a copy."""
    return tensor if tensor.is_cuda else tensor.numpy()  # CUDA: __cuda_array_interface__


def _drop_traceback(error: BaseException) -> None:
    """Unlinks a ucxx request error from the frames it passed through.

    ucxx's C++ worker keeps the failed request's Python future, the future keeps the
    exception, and the traceback keeps every frame's locals, among them the endpoint. A kept
    server endpoint keeps the UCX listener, whose port then accepts connections that never
    complete their handshake.
    """
    error.__traceback__ = None


class _UcxRuntime:
    """Counts the ucx servers/clients of this process and resets ucxx after the last one."""

    def __init__(self):
        self.num_users = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transports: str | None = None  # UCX_TLS of the live context

    def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        transports = os.environ.get("UCX_TLS")
        if self.num_users and loop is not self.loop:
            raise RuntimeError("all ucx KV servers and clients of a process must run on one "
                               "event loop (ucxx binds its context to the first one)")
        if self.num_users and transports != self.transports:
            raise RuntimeError(
                f"the process's UCX context runs with UCX_TLS={self.transports}, this KV "
                f"server/client wants {transports}: GPU and CPU caches cannot share a process")
        self.num_users += 1
        self.loop = loop
        self.transports = transports

    def release(self) -> None:
        self.num_users -= 1
        if self.num_users:
            return
        self.loop = None
        gc.collect()  # drop endpoints still waiting for their finalizers
        ucxx = _ucxx()
        context = ucxx.core._ctx  # pinned ucxx 0.52: the process-wide ApplicationContext
        if context is not None:
            # Wake the notifier thread now; otherwise reset() waits out its 1 s poll period.
            context.worker.stop_request_notifier_thread()
        del context  # reset() refuses while anything still references the context
        try:
            ucxx.reset()  # stops the notifier thread, drops the context
        except ucxx.exceptions.UCXError as e:
            logger.warning("ucxx.reset() after the last KV server/client closed: %s", e)


_RUNTIME = _UcxRuntime()


class _Connection:
    """One ucxx endpoint speaking the KV wire protocol."""

    early_receives = True  # tagged receives wait for their message (pipeline.py)

    def __init__(self, endpoint):
        self.endpoint = endpoint

    async def send_header(self, message: wire.Message) -> None:
        await self.endpoint.am_send(wire.encode(message))

    async def recv_header(self) -> wire.Message:
        return wire.decode(await self.endpoint.am_recv())

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self.endpoint.send(_as_ucx_buffer(payload))

    async def recv_payload(self, buffer: torch.Tensor) -> None:
        await self.endpoint.recv(_as_ucx_buffer(buffer))

    def abort(self) -> None:
        self.endpoint.abort()


class UcxKVServer(KVServer):
    """Serves leased blocks through a ucxx listener (which listens on every interface).

    `host` is the address advertised to clients; with a loopback host UCX is limited to "lo".
    max_concurrent_transfers bounds the pulls being sent at once (and their staging buffers).
    """

    scheme = "ucx"

    def __init__(self, kv_caches, resolve_lease, host: str = "127.0.0.1", port: int = 0,
                 net_devices: str | None = None, max_concurrent_transfers: int = 4, kv_heads=None):
        super().__init__(kv_caches, resolve_lease, host, port, kv_heads)
        if net_devices is None and _is_loopback(host):
            net_devices = "lo"
        configure_ucx_env(kv_caches[0].is_cuda, net_devices)
        self._copier = BlockCopier(kv_caches, self.layout, self.phases)
        self._staging = StagingPool(self._copier.device, host_mirror=False,
                                    size=max_concurrent_transfers)
        self._listener = None
        self._connections: set[_Connection] = set()
        self._handler_tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        if self._listener is not None:
            raise RuntimeError(f"UcxKVServer already serving at {self.address}")
        ucxx = _ucxx()
        _RUNTIME.acquire()
        try:
            self._listener = ucxx.create_listener(self._serve_endpoint, port=self.port)
        except BaseException:
            _RUNTIME.release()
            raise
        self.port = self._listener.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"ucx://{host}:{self.port}"
        return self.address

    async def close(self) -> None:
        if self._listener is None:
            return
        for connection in list(self._connections):
            connection.abort()  # pending am_recv / send in the handlers fail at once
        # Let the handlers return by themselves: a cancelled task keeps its traceback, whose
        # frames keep the endpoints, which keep the UCX listener (and its port) alive.
        tasks = list(self._handler_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)  # ucxx retires its handler futures one loop turn later
        self._connections.clear()
        # ucxx 0.52 keeps the UCX listener (and its port) alive as long as any endpoint it
        # accepted exists in C++, which here lasts until the process exits; clients that
        # connect meanwhile are aborted by _serve_endpoint or time out in their handshake.
        self._listener.close()
        self._listener = None
        _RUNTIME.release()

    async def _serve_endpoint(self, endpoint) -> None:
        if self._listener is None:
            # ucxx may keep a closed listener's port open (see close()): turn late clients away.
            endpoint.abort()
            return
        task = asyncio.current_task()
        self._handler_tasks.add(task)
        connection = _Connection(endpoint)
        self._connections.add(connection)
        peer = f"client endpoint {endpoint.uid:#x}"
        ucxx = _ucxx()
        try:
            hello = await asyncio.wait_for(connection.recv_header(), HANDSHAKE_TIMEOUT_S)
            try:
                wire.check_hello(wire.expect(hello, wire.Hello, peer), self.layout, peer)
            except KVTransferError as e:
                await connection.send_header(wire.Error(str(e)))
                logger.warning("refused KV %s: %s", peer, e)
                return
            await connection.send_header(wire.Hello(wire.PROTOCOL_VERSION, self.layout))
            while True:
                # An idle pooled endpoint waits here, without deadline, for its next pull.
                request = wire.expect(await connection.recv_header(), wire.PullRequest, peer)
                await serve_pull(self, self._copier, self._staging, connection, request)
        except (ucxx.exceptions.UCXError, KVTransferError, TimeoutError) as e:
            _drop_traceback(e)
            logger.debug("KV %s disconnected: %s", peer, e)
        finally:
            self._connections.discard(connection)
            self._handler_tasks.discard(task)
            connection.abort()


class UcxKVClient(KVClient):
    """Pulls blocks over pooled ucxx endpoints, one pool per server address.

    max_connections_per_peer bounds the pulls in flight to one server, max_concurrent_transfers
    those in flight in all (and their staging buffers). connect_timeout_s bounds the UCX
    handshake with a new server (see _connect).
    """

    scheme = "ucx"

    def __init__(self, kv_caches, max_connections_per_peer: int = 4,
                 max_concurrent_transfers: int = 4, net_devices: str | None = None,
                 connect_timeout_s: float = 1.5, kv_heads=None):
        super().__init__(kv_caches, kv_heads)
        if connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {connect_timeout_s}")
        if max_connections_per_peer < 1:
            raise ValueError(f"max_connections_per_peer must be >= 1, got "
                             f"{max_connections_per_peer}")
        configure_ucx_env(kv_caches[0].is_cuda, net_devices)
        self.max_connections_per_peer = max_connections_per_peer
        self.connect_timeout_s = connect_timeout_s
        self._copier = BlockCopier(kv_caches, self.layout, self.phases)
        self._staging = StagingPool(self._copier.device, host_mirror=False,
                                    size=max_concurrent_transfers)
        self._idle: dict[tuple[str, KVLayout], list[_Connection]] = {}  # per (address, its layout)
        self._connections: set[_Connection] = set()  # idle and busy
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._runtime_acquired = False
        self._closed = False

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline,
                    copier) -> int:
        if self._closed:
            raise RuntimeError("UcxKVClient is closed")
        host, port = split_address(address, self.scheme)
        ucxx = _ucxx()
        if not self._runtime_acquired:
            _RUNTIME.acquire()
            self._runtime_acquired = True
        slots = self._slots.setdefault(address, asyncio.Semaphore(self.max_connections_per_peer))
        key = (address, copier.layout)
        async with slots:
            connection = self._take_idle(key)
            reusable = False
            try:
                if connection is None:
                    connection = await self._connect(address, host, port, deadline, copier.layout)
                nbytes = await pull_on(connection, copier, self._staging,
                                       f"KV server {address}",
                                       lease_id, dst_block_ids, src_block_offset, deadline)
                reusable = True
                return nbytes
            except PullRefused:
                reusable = True  # the endpoint is still in step after an Error header
                raise
            except ucxx.exceptions.UCXError as e:
                _drop_traceback(e)
                raise KVTransferError(f"KV server {address} failed during pull of lease "
                                      f"{lease_id!r}: {type(e).__name__}: {e}") from e
            finally:
                if connection is not None:
                    if reusable and not self._closed:
                        self._idle.setdefault(key, []).append(connection)
                    else:
                        self._connections.discard(connection)
                        connection.abort()

    def _take_idle(self, key: tuple[str, KVLayout]) -> _Connection | None:
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            if not connection.endpoint.closed:
                return connection
            self._connections.discard(connection)
            connection.abort()
        return None

    async def _connect(self, address: str, host: str, port: int, deadline: float,
                       layout: KVLayout) -> _Connection:
        ucxx = _ucxx()
        # ucxx does not fail a handshake whose endpoint errored (dead peer, or a listener that
        # a live process closed): only this timeout ends it. Healthy peers take milliseconds.
        connect_timeout = min(self.connect_timeout_s, max(deadline - time.perf_counter(), 1e-3))
        try:
            endpoint = await ucxx.create_endpoint(host, port, connect_timeout=connect_timeout)
        except TimeoutError as e:
            raise KVTransferError(f"KV server {address} did not complete the UCX handshake "
                                  f"within {connect_timeout:.3f} s: is it running?") from e
        connection = _Connection(endpoint)
        self._connections.add(connection)
        try:
            await connection.send_header(wire.Hello(wire.PROTOCOL_VERSION, layout))
            hello = wire.expect(await connection.recv_header(), wire.Hello,
                                f"KV server {address}")
            wire.check_hello(hello, layout, f"KV server {address}")
        except BaseException:
            self._connections.discard(connection)
            connection.abort()
            raise
        return connection

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for connection in self._connections:
            connection.abort()
        self._connections.clear()
        self._idle.clear()
        if self._runtime_acquired:
            self._runtime_acquired = False
            _RUNTIME.release()


SERVER = UcxKVServer
CLIENT = UcxKVClient
