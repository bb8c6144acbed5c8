"""A duplex request channel between tensor-parallel rank 0 and one rank r > 0, for the KV transport.

tp_workers.py makes one socketpair per rank r > 0 when it spawns the worker (rank r's end is
passed as a file descriptor, tp_agent.py serves it). Either end sends requests and answers the
other's, each on its own event loop:

    rank 0 (the worker's event loop)              rank r (its KV agent's thread and loop)
    request("start", transport, host, heads) -->  handler -> the address of its KV server
    request("pull", RankPull, deadline_s) ----->  handler -> bytes moved | error message
    handler("resolve") <------------------------  request("resolve", lease_id) (its KV server)
    handler("served") <-------------------------  notify("served", counters) (no answer)

Frames: a 4-byte big-endian length, then the pickle of (message id, kind, body); kinds "ok" and
"error" answer the request of that id, any other kind is a request (body: its arguments),
answered by handlers[kind] in a task of its own (a long pull never holds up a lease
resolution); a message without an id is a notification, handled and not answered. Both ends are processes of one engine, created together, so the pickles come
from a trusted peer. A request whose link closes (the other process exited) fails with
LinkClosed, a KVTransferError: the pull or the lease resolution that needed it fails.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import pickle
import socket
import struct
from typing import Any, Callable

from pdserve.common.kv_transfer.base import KVTransferError

log = logging.getLogger("pdserve.kv_link")

_LENGTH = struct.Struct("!I")


class LinkClosed(KVTransferError):
    """The other rank's process closed the link (it exited)."""


class Link:
    """One end of a rank link: `request(kind, *args)` and the handlers of the other end's requests."""

    def __init__(self, sock: socket.socket, handlers: dict[str, Callable[..., Any]], peer: str):
        self._sock = sock
        self.handlers = handlers
        self.peer = peer  # for errors: "tensor-parallel rank 1"
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._closed: asyncio.Event | None = None

    async def start(self) -> None:
        self._closed = asyncio.Event()
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._read_task = asyncio.ensure_future(self._read_loop())

    async def request(self, kind: str, *args) -> Any:
        """Ask the other end; its handler's value, or KVTransferError (its error, or LinkClosed)."""
        if self._closed is None or self._closed.is_set():
            raise LinkClosed(f"{self.peer} is gone (its KV link is closed)")
        msg_id = next(self._ids)
        reply = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        try:
            self._send((msg_id, kind, args))
            return await reply
        finally:
            self._pending.pop(msg_id, None)

    def notify(self, kind: str, *args) -> None:
        """Tell the other end something; no answer (dropped once the link is closed)."""
        if self._closed is not None and not self._closed.is_set():
            self._send((None, kind, args))

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(data)) + data)  # small frames: the buffer takes them

    async def _read_loop(self) -> None:
        try:
            while True:
                (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
                msg_id, kind, body = pickle.loads(await self._reader.readexactly(length))
                if kind in ("ok", "error"):
                    reply = self._pending.get(msg_id)
                    if reply is not None and not reply.done():
                        if kind == "ok":
                            reply.set_result(body)
                        else:
                            reply.set_exception(KVTransferError(f"{self.peer}: {body}"))
                    continue
                task = asyncio.ensure_future(self._answer(msg_id, kind, body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            log.debug("KV link with %s closed: %s", self.peer, e)
        finally:
            self._closed.set()
            for reply in self._pending.values():
                if not reply.done():
                    reply.set_exception(LinkClosed(f"{self.peer} is gone (its KV link closed)"))

    async def _answer(self, msg_id: int | None, kind: str, args: tuple) -> None:
        try:
            value = self.handlers[kind](*args)
            if inspect.isawaitable(value):
                value = await value
            reply = (msg_id, "ok", value)
        except Exception as e:
            if not isinstance(e, KVTransferError):
                log.exception("KV link request %r from %s failed", kind, self.peer)
            reply = (msg_id, "error", str(e) if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}")
        if msg_id is not None and not self._closed.is_set():
            try:
                self._send(reply)
            except (ConnectionError, OSError, RuntimeError):  # the other end went away meanwhile
                pass
