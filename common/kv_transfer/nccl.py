"""KV transfer over a 2-rank NCCL group (CUDA caches) or gloo group (CPU caches): headers on a
TCP control connection, each payload chunk as ONE point-to-point send/recv.

    decode worker (NcclKVClient)                        prefill worker (NcclKVServer)
    pair[address] = control socket + 2-rank group        control listener (tcp) + TCPStore
      connect + Hello{layout} ------------------------>  check layout, Hello{layout}
                    <--------------------------------  Pair{group, store_port, backend}
      Pair (echo) | Error ---------------------------->
      ProcessGroupNCCL/Gloo(PrefixStore(group,          ... the same as rank 0
        TCPStore(server host, store_port)), rank 1, 2)
                    <========= 1-byte send/recv ======  (NCCL builds its communicator here)
      PullRequest{lease, offset, n, 1, timeout} ------>  resolve_lease, gather all layers
                    <--------------------------------  PullReply{nbytes, 1} | Error
      recv(staging) <=========== one send of the whole payload (staging, on the GPU) ====
      scatter staging -> dst_block_ids

The pair is set up on first use through the KV address that the prefill worker already
advertises (`nccl://host:port`, the control listener); its TCPStore is the rendezvous, so no
extra service. Each group is built from that store directly, never through the process's
global init_process_group. NCCL matches point-to-point operations by their order, not by tag,
so a pair carries one pull at a time (the server answers the requests of one connection in
order anyway); a decode process opens up to max_concurrent_transfers pairs ("lanes") per prefill
server as its pulls overlap, and pulls to different servers run at once. A pull given up inside
its exchange leaves its blocks at once and the exchange finishes in the background, so the
pair stays in step (NcclKVClient._pull). CPU caches use gloo through the same code, so CI runs it.

Failure: every wait is bounded (setup_timeout_s for the pair, the pull's deadline for a
payload), and while a payload is in flight each end also watches the control socket: a peer
that dies is noticed at once (an NCCL kernel waiting for a dead peer never returns by itself).
Any failure but a refusal drops the pair: the group is aborted (NCCL: ncclCommAbort ends its
kernels) and the socket closed; the next pull builds a new pair. The client raises
KVTransferError, so the decode worker recomputes the prompt.

`configure_nccl_env` (the one place that sets them, before a group is built) keeps a peer's
failure from killing this process: TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (abort the communicator,
not the process), no heartbeat monitor, no dumps; and NVLink multicast off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import uuid

import torch

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import KVClient, KVLayout, KVTransferError, split_address
from pdserve.common.kv_transfer.blocks import BlockCopier
from pdserve.common.kv_transfer.pipeline import (SEND_SLACK_S, Destination, PullRefused,
                                                 StagingPool, pull_on, serve_pull)
from pdserve.common.kv_transfer.tcp import (SocketConnection, TcpKVServer, accept_hello,
                                            open_connection)

logger = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 10.0  # a new pair: handshake, rendezvous and the first exchange
SETUP_BACKOFF_S, SETUP_BACKOFF_MAX_S = 1.0, 30.0  # after a failed pair set-up (SetupBackoff)
EXCHANGE_MIN_S = 5.0  # an exchange begun may outlive its pull's deadline by this (NcclKVClient._pull)
# A waiting thread asks NCCL whether its operation completed after POLL_S, then at intervals
# doubling up to POLL_MAX_S: each ask takes the GIL from the engine thread, and a fixed 20 us
# poll by every pull in flight held the decode's GIL ~20 % of the time at 100 req/s (issue 11);
# the doubling adds at most about the time already waited (a 32 MiB pull: ~0.4 ms).
POLL_S, POLL_MAX_S = 20e-6, 1e-3
GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # the group's own; our deadlines end waits first
SERVER_RANK, CLIENT_RANK = 0, 1


def configure_nccl_env() -> None:
    """Defaults for ProcessGroupNCCL (read when a group is built); a variable already set wins."""
    for name, value in {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_ENABLE_MONITORING": "0",
                        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0", "NCCL_NVLS_ENABLE": "0"}.items():
        os.environ.setdefault(name, value)


def group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class PairConnection:
    """The control socket (headers) and the pair's group (payloads) of one prefill-decode pair."""

    early_receives = False  # a posted NCCL receive cannot be taken back if the server refuses

    def __init__(self, control: SocketConnection, backend: str, peer_rank: int):
        self.control = control
        self.backend = backend
        self.peer_rank = peer_rank
        self.group = None  # ProcessGroupNCCL | ProcessGroupGloo, once built
        self.deadline = time.perf_counter() + SETUP_TIMEOUT_S  # perf_counter() of the current wait

    async def send_header(self, message: wire.Message) -> None:
        await self.control.send_header(message)

    async def recv_header(self) -> wire.Message:
        return await self.control.recv_header()

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self._complete(self.group.send([payload], self.peer_rank, 0), "send")

    async def recv_payload(self, buffer: torch.Tensor) -> None:
        await self._complete(self.group.recv([buffer], self.peer_rank, 0), "receive")

    async def build_group(self, store_host: str, store_port: int, group: str, rank: int,
                          device: torch.device, store=None) -> None:
        """Joins the pair's group (the server passes its own store) and runs the first exchange,
        in a thread: NCCL builds its communicator inside the first send/recv, blocking the
        caller until the peer joins, which must not stall the event loop."""
        local_host = self.control.sock.getsockname()[0]
        timeout_s = max(self.deadline - time.perf_counter(), 1e-3)
        deadline, stop = self.deadline, threading.Event()

        def join():
            self.group = _new_group(self.backend, store, store_host, store_port, group, rank,
                                    local_host, device, timeout_s)
            probe = torch.full((1,), rank == SERVER_RANK, dtype=torch.uint8, device=device)
            if rank == SERVER_RANK:
                _wait_work(self.group.send([probe], self.peer_rank, 0), self.backend, deadline, stop)
            else:
                _wait_work(self.group.recv([probe], self.peer_rank, 0), self.backend, deadline, stop)
                if int(probe.item()) != 1:
                    raise KVTransferError(f"the first exchange of pair {group} delivered {probe.item()}")
        try:
            await _in_thread(join, timeout_s + 1.0, f"set-up of {self.backend} pair {group}")
        finally:
            stop.set()

    async def _complete(self, work, what: str) -> None:
        """Waits for a posted send/recv until self.deadline; KVTransferError if it fails, times
        out, or the peer closes the control connection meanwhile."""
        stop = threading.Event()
        done = _start_thread(lambda: _wait_work(work, self.backend, self.deadline, stop))
        closed = self._peer_closed()
        try:
            while not done.done():
                await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed.done() and not done.done():
                    if closed.result():
                        raise KVTransferError(f"the KV peer closed the control connection during "
                                              f"a {self.backend} {what}")
                    closed = asyncio.get_running_loop().create_future()  # its next message: fine
            done.result()
        except TimeoutError:
            raise KVTransferError(f"{self.backend} {what} did not complete in time") from None
        except RuntimeError as e:  # the group's error (gloo: peer gone; NCCL: aborted)
            raise KVTransferError(f"{self.backend} {what} failed: {e}") from e
        finally:
            stop.set()
            self._stop_watching()

    def _peer_closed(self) -> asyncio.Future:
        """True once the peer closed the control socket; False if it sent a message instead."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        sock = self.control.sock

        def readable():
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self._stop_watching()
            if not future.done():
                future.set_result(data == b"")
        loop.add_reader(sock.fileno(), readable)
        return future

    def _stop_watching(self) -> None:
        if self.control.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.control.sock.fileno())

    def close(self) -> None:
        """Closes the socket and drops the group; NCCL's is aborted (its kernels waiting for the
        peer end). A gloo group is only dropped: its pairs close with it, failing pending
        operations, and an aborted gloo group terminates the process when it is destroyed."""
        self.control.close()
        group, self.group = self.group, None
        if group is not None and self.backend == "nccl":
            _start_thread(group.abort)  # NCCL's abort may take a moment; never wait for it


def _new_group(backend: str, store, store_host: str, store_port: int, group: str, rank: int,
               local_host: str, device: torch.device, timeout_s: float):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"pdserve-kv/{group}", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        options._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, 2, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = GROUP_TIMEOUT
    with torch.cuda.device(device):
        return dist.ProcessGroupNCCL(store, rank, 2, options)


def _wait_work(work, backend: str, deadline: float, stop: threading.Event) -> None:
    """Blocks until work completes (raises its error), TimeoutError after deadline or stop."""
    if backend == "gloo":  # gloo's work completes only inside wait(); a timeout closes the pair
        try:
            work.wait(datetime.timedelta(seconds=max(deadline - time.perf_counter(), 1e-3)))
        except RuntimeError as e:
            if "Timed out" in str(e):
                raise TimeoutError(str(e)) from e
            raise
        return
    interval = POLL_S
    while not work.is_completed():
        if stop.is_set() or time.perf_counter() > deadline:
            raise TimeoutError("deadline passed")
        time.sleep(interval)
        interval = min(2 * interval, POLL_MAX_S)
    work.wait()  # raises the work's error, if it failed


def _start_thread(fn) -> asyncio.Future:
    """Runs fn in a daemon thread (one stuck on a dead peer must not keep the process alive);
    returns a future of its result on the running loop (or None outside one)."""
    try:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
    except RuntimeError:
        loop = future = None

    def run():
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_settle, future, result, error)
    if future is not None:
        # A waiter that gave up (deadline, peer gone) no longer awaits it: mark its error seen.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
    threading.Thread(target=run, daemon=True, name="pdserve-nccl-wait").start()
    return future


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _in_thread(fn, timeout_s: float, what: str):
    try:
        return await asyncio.wait_for(asyncio.shield(_start_thread(fn)), timeout_s)
    except TimeoutError:
        raise KVTransferError(f"{what} did not complete within {timeout_s:.1f} s") from None
    except KVTransferError:
        raise
    except (RuntimeError, ValueError) as e:  # torch.distributed's errors (DistError is one)
        raise KVTransferError(f"{what} failed: {e}") from e


class NcclKVServer(TcpKVServer):
    """Serves leased blocks: the tcp server's listener as the control channel, a TCPStore for
    the pairs' rendezvous, and one 2-rank group per connected decode process.

    max_concurrent_transfers bounds the pulls being sent at once (and their staging buffers).
    """

    scheme = "nccl"
    host_mirror = False  # the group moves the payload from the staging buffer on the device

    def __init__(self, kv_caches, resolve_lease, host: str = "127.0.0.1", port: int = 0,
                 max_concurrent_transfers: int = 4, setup_timeout_s: float = SETUP_TIMEOUT_S,
                 kv_heads=None):
        super().__init__(kv_caches, resolve_lease, host, port, max_concurrent_transfers, kv_heads)
        configure_nccl_env()
        self.backend = group_backend(self._copier.device)
        self.setup_timeout_s = setup_timeout_s
        self._store = None
        self._pairs: set[PairConnection] = set()

    async def start(self) -> str:
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=self.setup_timeout_s))
        return await super().start()

    async def close(self) -> None:
        for pair in list(self._pairs):
            pair.close()
        await super().close()
        self._store = None

    async def _serve_connection(self, control: SocketConnection, peer: str) -> None:
        pair = PairConnection(control, self.backend, CLIENT_RANK)
        self._pairs.add(pair)
        try:
            if not await accept_hello(control, self.layout, peer):
                return
            group = uuid.uuid4().hex
            await control.send_header(wire.Pair(group, self._store.port, self.backend))
            answer = await asyncio.wait_for(control.recv_header(), self.setup_timeout_s)
            if wire.expect(answer, wire.Pair, f"client {peer}") != wire.Pair(
                    group, self._store.port, self.backend):
                raise KVTransferError(f"client {peer} answered {answer}, not the pair offered")
            pair.deadline = time.perf_counter() + self.setup_timeout_s
            await pair.build_group(self.host, self._store.port, group, SERVER_RANK,
                                   self._copier.device, store=self._store)
            while True:
                # An idle pair waits here, without deadline, for its next pull.
                request = wire.expect(await control.recv_header(), wire.PullRequest,
                                      f"client {peer}")
                pair.deadline = time.perf_counter() + request.timeout_s + SEND_SLACK_S
                await serve_pull(self, self._copier, self._staging, pair, request)
        except (ConnectionError, OSError, TimeoutError, KVTransferError) as e:
            if isinstance(e, (TimeoutError, KVTransferError)):  # not a client that went away
                logger.warning("KV pair with %s ended: %s: %s", peer, type(e).__name__, e)
            else:
                logger.debug("KV pair with %s ended: %s", peer, e)
        finally:
            self._pairs.discard(pair)
            pair.close()


class Lanes:
    """The lanes of one server: a pull takes one for its whole exchange (NCCL matches a pair's
    operations by order, so a pair carries one pull at a time). Lanes, and so pairs, are made
    as pulls overlap, up to `size`; a free one is reused lowest first, so a quiet client keeps
    one pair. One pair carried ~50 pulls/s under load (each exchange waits on both processes'
    event loops), which capped a 1P1D stack near 50 req/s (issue 11)."""

    def __init__(self, size: int):
        self._available = asyncio.Semaphore(size)
        self._idle: list[int] = []  # lanes made and free
        self._made = 0

    @contextlib.asynccontextmanager
    async def lane(self):
        async with self._available:
            if self._idle:
                lane = min(self._idle)
                self._idle.remove(lane)
            else:
                lane, self._made = self._made, self._made + 1
            try:
                yield lane
            finally:
                self._idle.append(lane)


class SetupBackoff:
    """After a pair's set-up to a server failed, pulls from it fail at once (the decode worker
    recomputes) until a backoff passes, doubling per failure up to SETUP_BACKOFF_MAX_S: every
    attempt builds an NCCL communicator (GPU memory, threads) that a failure may not give
    back, and one attempt per pull once exhausted a prefill GPU's memory and every core of
    its host (issue 11)."""

    def __init__(self):
        self._failed: dict[str, tuple[float, float, str]] = {}  # address -> (retry at, backoff, why)

    def check(self, address: str) -> None:
        entry = self._failed.get(address)
        if entry is not None and time.perf_counter() < entry[0]:
            raise KVTransferError(f"KV server {address}: the last pair set-up failed ({entry[2]}); "
                                  f"the next attempt in {entry[0] - time.perf_counter():.1f} s")

    def failed(self, address: str, why: str) -> None:
        previous = self._failed.get(address)
        backoff = SETUP_BACKOFF_S if previous is None else min(2 * previous[1], SETUP_BACKOFF_MAX_S)
        self._failed[address] = (time.perf_counter() + backoff, backoff, why)

    def succeeded(self, address: str) -> None:
        self._failed.pop(address, None)


class NcclKVClient(KVClient):
    """Pulls blocks through one pair (control connection + 2-rank group) per server address.

    setup_timeout_s bounds a new pair's handshake and rendezvous (within the pull's deadline);
    max_concurrent_transfers bounds the pulls in flight (the lanes per server, and in all) and
    their staging buffers.
    """

    scheme = "nccl"

    def __init__(self, kv_caches, setup_timeout_s: float = SETUP_TIMEOUT_S,
                 max_concurrent_transfers: int = 4, kv_heads=None):
        super().__init__(kv_caches, kv_heads)
        if setup_timeout_s <= 0:
            raise ValueError(f"setup_timeout_s must be > 0, got {setup_timeout_s}")
        configure_nccl_env()
        self.setup_timeout_s = setup_timeout_s
        self._copier = BlockCopier(self.kv_caches, self.layout, self.phases)
        self.backend = group_backend(self._copier.device)
        self._staging = StagingPool(self._copier.device, host_mirror=False,
                                    size=max_concurrent_transfers)
        # per (address, the layout expected there, lane): a tensor-parallel client pulls other
        # shards; up to max_concurrent_transfers lanes (pairs) per server run pulls at once
        self._pairs: dict[tuple[str, KVLayout, int], PairConnection] = {}
        self._lanes: dict[str, Lanes] = {}
        self.max_lanes = max_concurrent_transfers
        self._setups = SetupBackoff()
        self._closed = False

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline,
                    copier) -> int:
        """The pull runs as its own task, so that giving it up (its deadline; a decode request
        aborted while its KV loads) does not cut an exchange short: an NCCL receive cannot be
        taken back, so a pair left mid-exchange would have to be aborted and the next pull
        build a new communicator. Under load that churned communicators (each with threads
        of its own, some spinning) until the prefill worker used every core (issue 11). A pull
        given up while it waits for its turn just leaves; one inside the exchange leaves its
        destination blocks at once (nothing is written into them after `give_up`) while the
        exchange finishes in the background, bounded by its own deadline (at least
        EXCHANGE_MIN_S, told to the server) and by the peer's control socket, and the pair
        stays in step for the next pull."""
        if self._closed:
            raise RuntimeError("NcclKVClient is closed")
        destination = Destination()
        in_turn = asyncio.Event()
        work = asyncio.ensure_future(self._pull_in_turn(address, lease_id, dst_block_ids,
                                                        src_block_offset, deadline, copier,
                                                        destination, in_turn))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not in_turn.is_set():
                work.cancel()  # still waiting for the turn: nothing to finish
            await destination.give_up()
            work.add_done_callback(lambda w: w.cancelled() or w.exception())  # seen
            raise

    async def _pull_in_turn(self, address, lease_id, dst_block_ids, src_block_offset, deadline,
                            copier, destination: Destination, in_turn: asyncio.Event) -> int:
        host, port = split_address(address, self.scheme)
        lanes = self._lanes.setdefault(address, Lanes(self.max_lanes))
        async with lanes.lane() as lane:
            key = (address, copier.layout, lane)
            in_turn.set()
            if destination.given_up:
                raise KVTransferError(f"pull of lease {lease_id!r} given up before its turn")
            pair = self._pairs.pop(key, None)
            if pair is not None and not pair.control.is_alive():
                pair.close()  # the server went away while the pair was idle
                pair = None
            try:
                if pair is None:
                    self._setups.check(address)
                    try:
                        pair = await self._connect(address, host, port, deadline, copier.layout)
                    except (KVTransferError, OSError, TimeoutError) as e:
                        self._setups.failed(address, f"{type(e).__name__}: {e}")
                        raise
                    self._setups.succeeded(address)
                exchange_deadline = max(deadline, time.perf_counter() + EXCHANGE_MIN_S)
                pair.deadline = exchange_deadline
                nbytes = await pull_on(pair, copier, self._staging, f"KV server {address}",
                                       lease_id, dst_block_ids, src_block_offset,
                                       exchange_deadline, destination)
            except PullRefused:
                self._pairs[key] = pair  # still in step after an Error header
                raise
            except (ConnectionError, OSError) as e:
                if pair is not None:
                    pair.close()
                raise KVTransferError(f"KV server {address} failed during pull of lease "
                                      f"{lease_id!r}: {e}") from e
            except BaseException:
                if pair is not None:
                    pair.close()
                raise
            if self._closed:
                pair.close()
            else:
                self._pairs[key] = pair
            return nbytes

    async def _connect(self, address: str, host: str, port: int, deadline: float,
                       layout: KVLayout) -> PairConnection:
        setup_deadline = min(deadline, time.perf_counter() + self.setup_timeout_s)
        control = await asyncio.wait_for(open_connection(address, host, port, layout),
                                         max(setup_deadline - time.perf_counter(), 1e-3))
        pair = PairConnection(control, self.backend, SERVER_RANK)
        pair.deadline = setup_deadline
        try:
            offer = wire.expect(await control.recv_header(), wire.Pair, f"KV server {address}")
            if offer.backend != self.backend:
                message = (f"KV server {address} moves KV with {offer.backend}, this worker with "
                           f"{self.backend}: both caches must be on CUDA (nccl) or on CPU (gloo)")
                await control.send_header(wire.Error(message))
                raise KVTransferError(message)
            await control.send_header(offer)
            await pair.build_group(host, offer.store_port, offer.group, CLIENT_RANK,
                                   self._copier.device)
        except BaseException:
            pair.close()
            raise
        return pair

    async def close(self) -> None:
        self._closed = True
        for pair in self._pairs.values():
            pair.close()
        self._pairs.clear()


SERVER = NcclKVServer
CLIENT = NcclKVClient
