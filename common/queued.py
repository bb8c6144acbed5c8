"""take_queued: an asyncio.Queue's backlog taken at once, for consumers that coalesce what piled
up while they were busy (AsyncLLM.stream: engine steps of one request; the router's
DrainedStream: Decode stream messages). Torch-free."""

from __future__ import annotations

import asyncio
from typing import Callable


def take_queued(queue: asyncio.Queue, first, ends: Callable[[object], bool]) -> tuple[list, object]:
    """`first` and every item already queued behind it, up to the first item for which `ends` is
    true: (the items, that item or None). Never waits; the ending item is not put back."""
    items = [first]
    while not queue.empty():
        item = queue.get_nowait()
        if ends(item):
            return items, item
        items.append(item)
    return items, None
