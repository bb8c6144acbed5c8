"""KVEventPublisher: the worker's half of the prefix index (common/prefix_index.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import time

from redis.exceptions import RedisError

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine_client import EngineDeadError

log = logging.getLogger("pdserve.worker")


class _Snapshot:
    """Queue marker: everything the pool held at this point (a resync replaces the index entry)."""

    def __init__(self, held: list[bytes]):
        self.held = held


class KVEventPublisher:
    """The worker's half of the prefix index (services/router/prefix_index.py).

        engine thread, between steps, every interval_s (AsyncLLM.call_in_engine):
            pool.take_events() -> {hash: still held?} for each hash stored or removed --> SimpleQueue
        event loop, every interval_s:
            drain the queue in order, later states win -> PrefixIndex.publish(stored, removed)
        resync: call_in_engine(snapshot) puts a _Snapshot(held) marker into the same queue (events
            after it apply on top) -> PrefixIndex.replace(instance, held), one transaction. When:
            at start; after a failed publish (Redis down: retried every retry_s until it answers);
            when the Heartbeater re-registered (Redis restarted empty); and every refresh_s
            (index ttl / 3), which re-publishes every block held -- hit blocks included -- so
            nothing still cached expires from the index, while a dead worker's entries do.
        stop(): clear_instance, so routers forget this worker's blocks at once.

    Redis is never called from the engine thread; the hook only swaps a list and builds a dict.
    """

    def __init__(self, engine: AsyncLLM, index, instance_id: str, interval_s: float = 0.1,
                 refresh_s: float | None = None, retry_s: float = 1.0, registrations=lambda: 0):
        self.engine = engine
        self.index = index
        self.instance_id = instance_id
        self.interval_s = interval_s
        self.refresh_s = refresh_s if refresh_s is not None else index.ttl_s / 3
        self.retry_s = retry_s
        self.registrations = registrations  # () -> Heartbeater.num_registrations
        self.redis_ok = True
        self.num_publishes = 0
        self.num_resyncs = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._want_resync = True  # the first publication replaces what an earlier run left
        self._last_resync = -math.inf
        self._last_attempt = -math.inf
        self._seen_registrations = registrations()
        self._task: asyncio.Task | None = None

    def take_events(self, core) -> None:  # engine thread
        events = core.kv.pool.take_events()
        if events.stored or events.removed:
            cached = core.kv.pool.cached
            self._queue.put({h: h in cached for h in (*events.stored, *events.removed)})

    def _snapshot(self, core) -> None:  # engine thread
        core.kv.pool.take_events()  # older than the snapshot: superseded by it
        self._queue.put(_Snapshot(list(core.kv.pool.cached)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.instance_id}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except EngineDeadError:  # nothing left to publish: the worker is leaving (and its cancel
                return               # of this task may have been lost in wait_for, Python 3.11's)
            except Exception:  # never let the publisher die; the next resync repairs the index
                log.exception("publishing KV events failed")
                self._want_resync = True

    async def flush(self) -> None:
        """Publish what changed since the last flush (or resync); see the class doc."""
        await asyncio.wait_for(self.engine.call_in_engine(self.take_events), timeout=10)
        now = time.monotonic()
        registrations = self.registrations()
        if registrations != self._seen_registrations or now - self._last_resync >= self.refresh_s:
            self._seen_registrations = registrations
            self._want_resync = True
        resync = self._want_resync and now - self._last_attempt >= (self.retry_s if not self.redis_ok else 0)
        if resync:
            self._last_attempt = now
            await asyncio.wait_for(self.engine.call_in_engine(self._snapshot), timeout=10)
        pending, replace = self._drain()
        if self._want_resync and replace is None:
            return  # these changes would be superseded by the resync's snapshot anyway
        if replace is None and not pending:
            return
        try:
            if replace is not None:
                await self.index.replace(self.instance_id, [h for h, held in {**replace, **pending}.items() if held])
            else:
                await self.index.publish(self.instance_id, stored=[h for h, held in pending.items() if held],
                                         removed=[h for h, held in pending.items() if not held])
        except RedisError as e:  # the changes are lost: a resync republishes everything held
            if self.redis_ok:
                log.warning("%s: prefix index unreachable (%s); will resync when Redis answers", self.instance_id, e)
            self.redis_ok = False
            self._want_resync = True
            return
        self.num_publishes += 1
        if replace is not None:
            self.num_resyncs += 1
            self._last_resync = now
            self._want_resync = False
            if not self.redis_ok:
                log.warning("%s: prefix index resynced (%d blocks)", self.instance_id, len(replace))
            self.redis_ok = True

    def _drain(self) -> tuple[dict[bytes, bool], dict[bytes, bool] | None]:
        """(changes, snapshot) from the queue; changes queued before a snapshot are dropped."""
        pending: dict[bytes, bool] = {}
        replace = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return pending, replace
            if isinstance(item, _Snapshot):
                replace, pending = dict.fromkeys(item.held, True), {}
            else:
                pending.update(item)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # bounded: a cancel that lands as wait_for's inner call ends is swallowed there
            # (Python 3.11), and a stop must not wait on a loop that goes on
            await asyncio.wait([self._task], timeout=5)
        try:
            await self.index.clear_instance(self.instance_id)
        except Exception as e:  # shutting down anyway: the entries expire
            log.warning("could not clear %s from the prefix index: %s", self.instance_id, e)
        await self.index.close()
