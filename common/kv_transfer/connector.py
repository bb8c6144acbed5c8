"""The two KV connectors of disaggregated serving (the engine seam: common/engine/kv_connector.py).

Prefill worker: `LeaseConnector`. A request added with `kv_transfer=LEASE` keeps its prompt's
blocks after it finishes, under a lease that the KV server resolves for pulling decode workers:

    Prefill RPC -> add_request(kv_transfer=LEASE) -> ... first token sampled, request finished
      -> request_finished(): lease id, expiry       (scheduler: KVCacheManager.lease)
      -> take_lease(request id) -> (lease id, block ids)   (the servicer answers with a handle)
      -> resolve(lease id) by the KV server while decode pulls; release(lease id) on ReleaseLease,
         or expiry (on_step)

Decode worker: `PullConnector`. A request added with `kv_transfer=PullSpec(...)` (the prefill's
handle) is parked by the scheduler while this connector pulls the blocks it lacks:

    num_external_tokens(): the spec's token count, or 0 when the handle is unusable here
    start_load(): a pull task on the worker's event loop (deadline) -> finished_loads() -> engine
    then: the lease is released on the prefill worker (`release`), pulled or not

Tensor parallel (either side): the handle lists one KV server per prefill rank with its KV heads
(`PullSpec.shards`); the task plans one pull per decode rank (tp_pull.py), runs rank 0's here and
sends the others to their ranks' KV agents (`ranks`, tp_agent.py), and reports the load only
when every rank has answered: one failed rank fails the load (decode recomputes), and no rank
still writes into the blocks once it is reported.

Per-request results (`TransferResult`: bytes, seconds, error) wait for the decode servicer to
report them on the request's first chunk (`take_result`). Counters are totals for /metrics.
Engine-side methods run on the engine thread; the pulls on the event loop given at construction.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from pdserve.common.engine.kv_connector import KVConnector
from pdserve.common.kv_transfer.base import KVClient, KVLayout, KVTransferError
from pdserve.common.kv_transfer.tp_pull import KVShardAddress, RankPull, plan_rank_pulls, run_rank_pull
from pdserve.common.kv_transfer.tp_reshard import plan_heads
from pdserve.common.request import Request

log = logging.getLogger("pdserve.kv_connector")

RANK_GRACE_S = 5.0  # past the pull deadline, how long a tensor-parallel rank may take to end its part
LEASE = "lease"  # kv_transfer value of a prefill request whose prompt KV is handed off


class LeaseConnector(KVConnector):
    def __init__(self, lease_ttl_s: float = 30.0):
        self.lease_ttl_s = lease_ttl_s
        self._leases: dict[str, str] = {}  # user request id -> lease id, until the servicer takes it
        self.num_leases = 0
        self.num_released = 0

    def request_finished(self, req: Request) -> tuple[str, float] | None:
        if req.kv_transfer != LEASE:
            return None
        # Unguessable: holding the id is what lets a KV server's client pull these blocks (lease ids
        # travel only inside the gRPC calls, which --internal-token protects).
        lease_id = f"{req.parent_id}@{secrets.token_hex(16)}"
        self._leases[req.parent_id] = lease_id
        self.num_leases += 1
        return lease_id, time.monotonic() + self.lease_ttl_s

    def take_lease(self, request_id: str) -> tuple[str, list[int]] | None:
        """The lease of a finished prefill and its block ids (None: nothing leased or expired)."""
        lease_id = self._leases.pop(request_id, None)
        block_ids = None if lease_id is None else self.resolve(lease_id)
        return None if block_ids is None else (lease_id, block_ids)

    def resolve(self, lease_id: str) -> list[int] | None:
        """Block ids of a live lease (the KV server's LeaseResolver; any thread)."""
        return self.kv.lease_block_ids(lease_id, time.monotonic())

    def remaining_s(self, lease_id: str) -> float | None:
        """Seconds until the lease expires (None: unknown or gone), any thread: the ipc KV server
        announces it, so that a copy ending sooner needs no check that the lease outlived it."""
        entry = self.kv.leases.get(lease_id)
        return None if entry is None else entry[1] - time.monotonic()

    def release(self, lease_id: str) -> bool:
        """Engine thread: the lease's blocks go back to the pool."""
        released = self.kv.release_lease(lease_id)
        self.num_released += released
        return released

    def on_step(self) -> None:
        self.kv.expire_leases(time.monotonic())

    @property
    def num_expired(self) -> int:
        return self.kv.num_expired_leases

    @property
    def num_active(self) -> int:
        return len(self.kv.leases)


@dataclass(frozen=True)
class PullSpec:
    """Where a prompt's KV waits (from the prefill's KV handle)."""
    transport: str
    address: str  # the KV server's transfer address (rank 0's)
    lease_id: str
    num_tokens: int
    block_size: int
    control_address: str  # the prefill's gRPC address, for ReleaseLease
    shards: tuple[KVShardAddress, ...] = ()  # one per prefill rank; (): one server with every KV head
    num_kv_heads: int | None = None  # the prefill model's KV heads (None: not given)


@dataclass
class TransferResult:
    nbytes: int = 0
    seconds: float = 0.0
    error: str | None = None  # why the handle was not used ("" / None: used)


class PullConnector(KVConnector):
    def __init__(self, clients: dict[str, KVClient], loop: asyncio.AbstractEventLoop,
                 release: Callable[[PullSpec], Awaitable[None]], deadline_s: float = 10.0):
        self.clients = clients
        self.loop = loop
        self.release = release
        self.deadline_s = deadline_s
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks: dict[str, "asyncio.Future"] = {}
        self._results: dict[str, TransferResult] = {}
        self.num_pulls = 0
        self.num_failures = 0
        self.bytes_received = 0
        self.seconds = 0.0
        self.pull_seconds: list[float] = []  # latencies not yet observed by /metrics (drained there)
        self.ranks = None  # tp_agent.RankAgents of decode ranks 1..N-1 (tensor parallel), else None
        self.rank_layouts: list[KVLayout] = []  # each rank's cache layout; []: one rank, the client's

    def set_ranks(self, rank_layouts: list[KVLayout], ranks=None) -> None:
        """Tensor parallel: every rank's cache layout (rank order) and rank 0's handle on the others."""
        self.rank_layouts, self.ranks = rank_layouts, ranks

    def _layouts(self, spec: PullSpec) -> list[KVLayout]:
        return self.rank_layouts or [self.clients[spec.transport].layout]

    def _shards(self, spec: PullSpec) -> list[KVShardAddress]:
        if spec.shards:
            return list(spec.shards)
        return [KVShardAddress(spec.address, 0, spec.num_kv_heads or self._layouts(spec)[0].total_kv_heads)]

    def num_external_tokens(self, req: Request) -> int:
        spec = req.kv_transfer
        if not isinstance(spec, PullSpec):
            return 0
        reason = None
        if spec.transport not in self.clients:
            reason = f"handle not usable here (transport {spec.transport!r})"
        elif spec.block_size != self.kv.block_size:
            reason = f"handle not usable here (block size {spec.block_size}, here {self.kv.block_size})"
        elif spec.num_tokens != req.num_prompt_tokens:
            reason = f"handle covers {spec.num_tokens} tokens, the prompt has {req.num_prompt_tokens}"
        else:
            reason = self._heads_unusable(spec)
        if reason is not None:
            self._results[req.request_id] = TransferResult(error=reason)
            self._release_soon(spec)
            return 0
        return spec.num_tokens

    def _heads_unusable(self, spec: PullSpec) -> str | None:
        layouts = self._layouts(spec)
        total = layouts[0].total_kv_heads
        if spec.num_kv_heads is not None and spec.num_kv_heads != total:
            return f"handle not usable here (the prefill's model has {spec.num_kv_heads} KV heads, this one {total})"
        try:
            plan_heads([(s.first_kv_head, s.num_kv_heads) for s in self._shards(spec)],
                       [(layout.first_kv_head, layout.num_kv_heads) for layout in layouts])
        except ValueError as e:
            return f"handle not usable here ({e})"
        return None

    def skip_load(self, req: Request) -> None:
        self._results[req.request_id] = TransferResult(error="no free KV blocks for the pull; recomputing")
        self._release_soon(req.kv_transfer)

    def start_load(self, req: Request, block_ids: list[int], num_cached_blocks: int) -> None:
        self._tasks[req.request_id] = asyncio.run_coroutine_threadsafe(
            self._pull(req.request_id, req.kv_transfer, block_ids, num_cached_blocks), self.loop)

    def cancel_load(self, req: Request) -> None:
        task = self._tasks.get(req.request_id)
        if task is not None:
            task.cancel()

    def finished_loads(self) -> list[tuple[str, bool]]:
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def take_result(self, request_id: str) -> TransferResult | None:
        return self._results.pop(request_id, None)

    async def _pull(self, rid: str, spec: PullSpec, block_ids: list[int], num_cached_blocks: int) -> None:
        result = self._results[rid] = TransferResult()
        t0 = time.perf_counter()
        ok = False
        try:
            if block_ids:
                pulls = plan_rank_pulls(self._shards(spec), self._layouts(spec), spec.lease_id, block_ids,
                                        num_cached_blocks)
                result.nbytes = await self._pull_ranks(self.clients[spec.transport], pulls)
            ok = True
        except (KVTransferError, OSError) as e:
            result.error = str(e)
            log.warning("pull for %s failed, recomputing: %s", rid, e)
        except asyncio.CancelledError:
            result.error = "cancelled"
            raise
        finally:
            result.seconds = time.perf_counter() - t0
            self.num_pulls += 1
            self.num_failures += not ok
            self.bytes_received += result.nbytes
            self.seconds += result.seconds
            self.pull_seconds.append(result.seconds)
            self._tasks.pop(rid, None)
            self._done.put((rid, ok))
            self.wake()
            self._release_soon(spec)

    async def _pull_ranks(self, client: KVClient, pulls: list[RankPull]) -> int:
        """Rank 0's pull here, the others' through their agents; the total bytes once ALL ended
        (a cancelled load stops rank 0's pull and still waits for the others: they end by the
        deadline), or the first error."""
        tasks = [asyncio.ensure_future(run_rank_pull(client, pulls[0], self.deadline_s))]
        tasks += [asyncio.ensure_future(self.ranks.pull(rank, pull, self.deadline_s))
                  for rank, pull in enumerate(pulls[1:], start=1)]
        cancelled = False
        # each rank ends its pull by the deadline; one that does not answer by then + RANK_GRACE_S
        # is stalled (a frozen process): the load fails (decode recomputes; the TP watchdog then
        # fails the instance at its next step) instead of waiting on that rank forever
        give_up = time.monotonic() + self.deadline_s + RANK_GRACE_S
        while True:
            try:
                await asyncio.wait(tasks, timeout=max(give_up - time.monotonic(), 0))
                break
            except asyncio.CancelledError:
                cancelled = True
                tasks[0].cancel()
        late = [rank for rank, t in enumerate(tasks) if not t.done()]
        for t in tasks:
            t.cancel()
        if cancelled:
            raise asyncio.CancelledError
        if late:
            raise TimeoutError(f"tensor-parallel rank(s) {late} did not end their KV pull within "
                               f"{self.deadline_s + RANK_GRACE_S:g} s")
        errors = [t.exception() for t in tasks if t.exception() is not None]
        if errors:
            raise errors[0]
        return sum(t.result() for t in tasks)

    def _release_soon(self, spec: PullSpec) -> None:
        """Release the lease on the prefill worker, from the event loop, without waiting."""
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.release(spec)))
