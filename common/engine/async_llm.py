"""AsyncLLM: the EngineCore driven by a background thread, consumed from asyncio (`pdserve serve`,
the prefill and decode services).

    event loop                          engine thread
    generate() --(inbox: add/abort)-->  loop: drain inbox -> core.step() -> outputs
    per-request asyncio.Queue  <--call_soon_threadsafe--   (one RequestOutput per step)

Torch ops release the GIL, so the event loop keeps serving HTTP while a step runs. If the engine
thread dies, every waiting request gets EngineDeadError at once (nothing hangs).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from pdserve.common.config import EngineConfig
from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.outputs import RequestOutput
from pdserve.common.sampling_params import SamplingParams

log = logging.getLogger("pdserve.async_llm")


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, core: EngineCore | None = None):
        self.core = core or EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.model_name = self.core.model_name
        self.max_model_len = self.core.max_model_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        self.step_hooks: list[Callable[[EngineCore], None]] = []  # run on the engine thread after each step
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # ---- EngineClient ------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None, output_token_ids: list[list[int]] | None = None,
                       add_fn: Callable[[EngineCore], object] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. `add_fn(core)`, when given, enters the request into the
        engine instead of a plain add_request (prefill leases, decode admission after a pull)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")
        self.core.validate(prompt_token_ids, params)  # ParameterError before anything is queued
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            from pdserve.common.sampling_params import ParameterError
            raise ParameterError("request_id", f"request id {request_id!r} is already running")
        self._streams[request_id] = (loop, q)
        if add_fn is None:
            self._send(("add", (request_id, prompt_token_ids, params, prompt, time.time(), output_token_ids)))
        else:
            self._send(("addfn", (request_id, add_fn)))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self._send(("abort", [request_id]))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", [request_id]))

    async def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def call_in_engine(self, fn: Callable[[EngineCore], object]) -> "asyncio.Future":
        """Run fn(core) on the engine thread between steps (e.g. admitting a request whose KV
        arrived); returns an awaitable with its result."""
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

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, ids, params, prompt, arrival, done = payload
                try:
                    self.core.add_request(rid, ids, params, prompt=prompt, arrival_time=arrival,
                                          output_token_ids=done)
                except Exception as e:
                    self._deliver(rid, e)
            elif kind == "addfn":
                rid, fn = payload
                try:
                    fn(self.core)
                except Exception as e:
                    self._deliver(rid, e)
            elif kind == "abort":
                self.core.abort(payload)
            elif kind == "call":
                fn, loop, fut = payload
                try:
                    result = fn(self.core)
                    loop.call_soon_threadsafe(_set_result, fut, result, None)
                except Exception as e:
                    loop.call_soon_threadsafe(_set_result, fut, None, e)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_unfinished():
                    for out in self.core.step():
                        self._deliver(out.request_id, out)
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.core.check_alive()  # a dead tensor-parallel rank fails the instance while idle too
                for hook in self.step_hooks:  # also while idle (lease expiry, KV events)
                    hook(self.core)
        except BaseException as e:  # the engine is gone: fail every open request now
            log.exception("engine thread died")
            self._dead = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine died: {e}"))

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)


def _set_result(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
