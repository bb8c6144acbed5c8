"""AsyncLLM: the EngineCore driven by a background thread, consumed from asyncio (`pdserve serve`,
the prefill and decode services).

    event loop                          engine thread
    stream() --(inbox: add/abort/stop)--> loop: drain inbox -> core.step() -> EngineOutputs
    per-request asyncio.Queue  <--call_soon_threadsafe--   (the request's deltas of one step)
      a consumer that lags takes every step queued meanwhile as ONE item (merge_step_outputs),
      so a slow hop (gRPC to the router, SSE) sends fewer, larger messages instead of a backlog
    generate() = stream() through a RequestState (detokenize, stop strings): RequestOutputs

Workers consume `stream()` (deltas go on the wire as they are); `pdserve serve` consumes
`generate()`.

Torch ops release the GIL, so the event loop keeps serving HTTP while a step runs. If the engine
thread dies (a step raised, a tensor-parallel rank died), every waiting request gets
EngineDeadError at once, so does every message still in the inbox (an `add`'s stream, a
`call_in_engine`'s future), and every later call (`attach`, `stream`, `call_in_engine`) raises it
at once: nothing waits on an engine that will never answer. `on_death` tells its owner (a worker
then leaves the registry and exits). After `shutdown()` the same holds (nothing is left to answer).

The engine thread also builds the EngineCore (the constructor waits for it): torch's CPU ops run
on OpenMP, whose worker pools belong to the thread that opens a parallel region, and once two
threads have pools libgomp counts more threads than cores and stops spinning between regions
(every region then wakes its workers through the kernel: CPU decode steps ~1.4x slower).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

from pdserve.common.config import EngineConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.kv_connector import KVConnector
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.output_processor import RequestState
from pdserve.common.outputs import EngineOutput, RequestOutput, merge_step_outputs
from pdserve.common.queued import take_queued
from pdserve.common.sampling_params import ParameterError, SamplingParams

log = logging.getLogger("pdserve.async_llm")

# A stalled engine (EngineCore.stalled) sleeps until woken (a request added or aborted, a lease
# released, a KV load finished) or this long: lease expiry is checked between waits.
STALL_WAIT_S = 0.05


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, core: EngineCore | None = None,
                 connector: KVConnector | None = None):
        self._wake = threading.Event()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.core: EngineCore | None = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (its consumer's event loop, sink called there with each step's deltas)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[object], None]]] = {}
        self._trackers: dict = {}  # request id -> DeltaTracker (workers: request_metrics set)
        self._dead: BaseException | None = None  # why the engine thread ended (None: it runs)
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(config, connector), name="pdserve-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer = self.core.tokenizer
        self.model_name = self.core.model_name
        self.max_model_len = self.core.max_model_len
        # Set by a worker (its requests have no front end here): `stream` then counts vLLM's
        # request metrics from the deltas (common/request_metrics.py). `serve` leaves it None: its
        # OpenAI front end counts them from the RequestOutputs.
        self.request_metrics = None

    # ---- EngineClient ------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs of one request (the front end of `pdserve serve`): the
        engine's deltas through a RequestState, stop strings stopped in the engine."""
        state = RequestState(self.tokenizer, request_id, prompt, prompt_token_ids, params)
        async with aclosing(self.stream(request_id, prompt_token_ids, params,
                                        arrival_time=state.metrics.arrival_time)) as deltas:
            async for outs in deltas:
                stopped = [(o.request_id, o.index) for o in outs if state.add(o)]
                if stopped:
                    self._send(("stop", stopped))
                out = state.output()
                yield out
                if out.finished:
                    return

    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     output_token_ids: list[list[int]] | None = None, kv_transfer: object | None = None,
                     arrival_time: float | None = None,
                     finished_indices: list[int] = ()) -> AsyncIterator[list[EngineOutput]]:
        """The engine's deltas of one request, one list per step that touched it, until all its
        sequences finished. Closing the iterator early aborts the request. `finished_indices`:
        sequences that already ended elsewhere (given in output_token_ids, not continued)."""
        q: asyncio.Queue = asyncio.Queue()
        await self.attach(request_id, prompt_token_ids, params, q.put_nowait, output_token_ids, kv_transfer,
                          arrival_time, finished_indices)
        finished = [i in finished_indices for i in range(params.n)]
        held = None  # an error queued behind deltas that were coalesced: raised next
        try:
            while True:
                item, held = (held, None) if held is not None else (await q.get(), None)
                if isinstance(item, BaseException):
                    raise item
                # the consumer lags: every step queued meanwhile as one item
                steps, held = take_queued(q, item, lambda x: isinstance(x, BaseException))
                item = functools.reduce(merge_step_outputs, steps)
                self.observe(request_id, item)
                yield item
                for o in item:
                    finished[o.index] |= o.finished
                if all(finished):
                    return
        finally:
            self.detach(request_id, abort=not all(finished))  # the consumer went away: abort

    async def attach(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     sink: Callable[[object], None], output_token_ids: list[list[int]] | None = None,
                     kv_transfer: object | None = None, arrival_time: float | None = None,
                     finished_indices: list[int] = ()) -> None:
        """Add a request whose news goes to `sink` on this event loop: sink(deltas of one step)
        for each step that touched it (one call per step, not coalesced), or sink(exception).
        The consumer calls `observe` with the deltas it passes on (request metrics) and `detach`
        at the end (after the last delta, or early with abort). The engine thread wakes each
        event loop once per step for all of its requests (`_deliver_all`), so a consumer of many
        requests (the decode worker's DecodeStream) is woken once, not once per request."""
        self._raise_if_dead()
        if request_id in self._streams:
            raise ParameterError("request_id", f"request id {request_id!r} is already running")
        if params.structured_outputs is not None:  # compile off the loop and the engine thread (cached)
            await asyncio.to_thread(self.core.structured.compile_ahead, params)
        self.core.validate(prompt_token_ids, params)  # ParameterError before anything is queued
        arrival_time = arrival_time or time.time()
        if self.request_metrics is not None:
            from pdserve.common.request_metrics import DeltaTracker
            self._trackers[request_id] = DeltaTracker(self.request_metrics, arrival_time, len(prompt_token_ids),
                                                      params.n, finished_indices)
        self._streams[request_id] = (asyncio.get_running_loop(), sink)
        self._send(("add", (request_id, prompt_token_ids, params, arrival_time, output_token_ids,
                            kv_transfer, finished_indices)))

    def observe(self, request_id: str, outs: list[EngineOutput], batch=None) -> None:
        """A consumer passes these deltas on now (a worker's request metrics count them).
        `batch` (from metrics_batch()): of many requests' deltas passed on together, counted at
        its flush()."""
        tracker = self._trackers.get(request_id)
        if tracker is not None:
            tracker.observe(outs, time.time() if batch is None else batch.now, batch)

    def metrics_batch(self):
        """A MetricsBatch for the observe() calls of one message (flush() it after them); None
        when this engine counts no request metrics."""
        if self.request_metrics is None:
            return None
        from pdserve.common.request_metrics import MetricsBatch
        return MetricsBatch(self.request_metrics)

    def detach(self, request_id: str, abort: bool) -> None:
        """Stop delivering a request's news; `abort`: it has not finished, abort it in the engine."""
        self._streams.pop(request_id, None)
        tracker = self._trackers.pop(request_id, None)
        if tracker is not None:
            tracker.close()
        if abort:
            self._send(("abort", [request_id]))

    def stop_sequences(self, sequences: list[tuple[str, int]]) -> None:
        """Finish (request id, index) sequences whose text a front end ended with a stop string."""
        self._send(("stop", sequences))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", [request_id]))

    def abort_all(self) -> int:
        """Abort every request in flight: each consumer gets its last output (finish_reason
        "abort"). -> how many there were."""
        open_ids = list(self._streams)
        if open_ids:
            self._send(("abort", open_ids))
        return len(open_ids)

    async def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead(self) -> BaseException | None:
        """Why the engine thread ended (a failure, or EngineDeadError after shutdown); None while it runs."""
        return self._dead

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """callback(error) once the engine thread died of a failure (not at shutdown()), on the
        engine thread; at once (here) if it already has."""
        self._death_callbacks.append(callback)
        if self._dead is not None and not self._stopping:
            callback(self._dead)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")

    def call_in_engine(self, fn: Callable[[EngineCore], object]) -> "asyncio.Future":
        """Run fn(core) on the engine thread between steps; returns an awaitable with its result.
        A dead engine raises EngineDeadError here, and a call it can no longer run (it died with
        the call queued) fails its future with it."""
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._send(("call", (fn, loop, fut)))
        return fut

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.core.shutdown()

    # ---- engine thread -----------------------------------------------------------------------
    def _send(self, msg) -> None:
        self._inbox.put(msg)
        self._wake.set()
        if self._dead is not None:  # it died meanwhile, perhaps after its last look at the inbox
            self._fail_inbox()

    def _fail_inbox(self) -> None:
        """Any thread, once the engine is dead: what waits in the inbox fails (each message is
        taken once, by whichever thread gets it)."""
        error = EngineDeadError(f"the engine is dead: {self._dead}")
        for kind, payload in self._taken_inbox():
            if kind == "add":
                self._deliver(payload[0], error)
            elif kind == "call":
                _, loop, fut = payload
                call_soon(loop, _set_result, fut, None, error)

    def _taken_inbox(self):
        """The inbox's messages, each taken (by this thread alone) until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for kind, payload in self._taken_inbox():
            if kind == "add":
                rid, ids, params, arrival, done, kv_transfer, finished = payload
                try:
                    self.core.add_request(rid, ids, params, arrival_time=arrival, output_token_ids=done,
                                          kv_transfer=kv_transfer, finished_indices=finished)
                except Exception as e:
                    self._deliver(rid, e)
            elif kind == "abort":
                self._deliver_all(self.core.abort(payload))
            elif kind == "stop":
                self.core.stop_sequences(payload)
            elif kind == "call":
                fn, loop, fut = payload
                try:
                    result = fn(self.core)
                    call_soon(loop, _set_result, fut, result, None)
                except Exception as e:
                    call_soon(loop, _set_result, fut, None, e)

    def _run(self, config: EngineConfig | None, connector: KVConnector | None) -> None:
        try:
            if self.core is None:  # built here, where every step runs (module docstring)
                self.core = EngineCore(config, connector=connector, wake=self._wake.set)
        except BaseException as e:
            self._build_error = e
            return
        finally:
            self._built.set()
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_work():
                    self._deliver_all(self.core.step())
                    if self.core.stalled:  # nothing can run until something frees blocks
                        self._wake.wait(timeout=STALL_WAIT_S)
                        self._wake.clear()
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.core.check_alive()  # a dead tensor-parallel rank fails the instance while idle too
                    if self.core.has_unfinished():  # a KV connector's load may have finished
                        self._deliver_all(self.core.step())
                self.core.housekeeping()
        except BaseException as e:  # the engine is gone: fail every open request now
            log.exception("engine thread died")
            self._dead = e
            self._fail_all()
            for callback in self._death_callbacks:
                try:
                    callback(e)
                except Exception:
                    log.exception("an engine death callback failed")
            return
        # shutdown(): nothing will answer what is still open either
        self._dead = EngineDeadError("the engine was shut down")
        self._fail_all()

    def _fail_all(self) -> None:
        """The engine thread is ending: every open stream and every queued message fails now
        (a stream attached from now on fails in attach(); one whose `add` raced with this, in
        _fail_inbox, run by whichever thread sees the message)."""
        self._fail_inbox()
        error = EngineDeadError(f"the engine died: {self._dead}")
        for rid in list(self._streams):
            self._deliver(rid, error)

    def _deliver_all(self, outputs: list[EngineOutput]) -> None:
        """A step's deltas to their consumers: one wake-up per event loop, not one per request
        (each call_soon_threadsafe writes the loop's self-pipe and wakes it: at a batch of 250
        that was 250 system calls and loop iterations a step)."""
        by_request: dict[str, list[EngineOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, outs in by_request.items():
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], outs))
        for loop, items in by_loop.items():
            call_soon(loop, _sink_all, items)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, sink = stream
            call_soon(loop, sink, item)


def call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """fn(*args) on `loop` from any thread; nothing when that loop is closed (its consumer is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _sink_all(items: list) -> None:
    for sink, item in items:
        try:
            sink(item)
        except Exception:  # one consumer's bug must not starve the others of this step
            log.exception("a request's consumer failed on its deltas")


def _set_result(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
