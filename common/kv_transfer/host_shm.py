"""Host (CPU) KV caches that another process of the same host can map: the ipc backend on CPU.

    prefill process                                   decode process (same host, same pid namespace)
    shared_zeros(shape, dtype)                        map_host(export)
      memfd "pdserve-kv-<token>" (fd kept open)         open /proc/<pid>/fd/<fd>, check the name
      mmap MAP_SHARED -> the engine's KV tensor         mmap MAP_SHARED -> a tensor over the same pages
    host_export(tensor) -> {pid, fd, token, ...}  ---Hello/Mapping-->

A memfd rather than a file in /dev/shm: it never outlives its holders (a killed prefill leaves
nothing behind; a mapping the decode still holds stays valid until it is dropped) and it is not
bound by the size of a container's /dev/shm mount (64 MiB under docker by default). The price:
the peer opens it through /proc/<pid>/fd, so both processes must share one pid namespace (one
container, or `pid: host`). Pages are zero-filled on first touch, as the runner's private pool.

Only the ipc transport asks for this memory (the worker sets CacheConfig.shared_host_kv); every
other transport keeps the runner's private anonymous mapping.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import threading
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Region:
    fd: int
    token: str
    nbytes: int


_regions: dict[int, _Region] = {}  # base address of a shared mapping -> its memfd
_lock = threading.Lock()


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor in a memfd mapping that host_export can hand to another process."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= 0:
        raise ValueError(f"a shared KV pool needs at least one byte, got shape {shape}")
    token = secrets.token_hex(8)
    fd = os.memfd_create(f"pdserve-kv-{token}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    tensor = torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    base = tensor.untyped_storage().data_ptr()
    with _lock:
        # The fd stays open while the memory lives: peers open the memory through it.
        _regions[base] = _Region(fd, token, nbytes)
    # When the last tensor over the mapping goes, forget the region and close its fd: a later
    # private tensor at the same address must not be exported as this (stale) memory.
    weakref.finalize(buf, _forget, base, fd)
    return tensor


def _forget(base: int, fd: int) -> None:
    with _lock:
        region = _regions.get(base)
        if region is not None and region.fd == fd:
            del _regions[base]
    os.close(fd)


def host_export(tensor: torch.Tensor) -> dict | None:
    """What a peer needs to map `tensor` (a view of a shared_zeros tensor), or None when its memory
    is private to this process."""
    base = tensor.untyped_storage().data_ptr()
    with _lock:
        region = _regions.get(base)
    if region is None:
        return None
    return dict(pid=os.getpid(), fd=region.fd, token=region.token, nbytes=region.nbytes,
                offset=tensor.data_ptr() - base)


def map_host(export: dict, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The peer's tensor, mapped into this process (OSError/ValueError when it cannot be)."""
    path = f"/proc/{int(export['pid'])}/fd/{int(export['fd'])}"
    name = os.readlink(path)  # "/memfd:pdserve-kv-<token> (deleted)"
    if f"pdserve-kv-{export['token']}" not in name:
        raise ValueError(f"{path} is {name!r}, not the peer's KV memory (another pid namespace?)")
    fd = os.open(path, os.O_RDWR)
    try:
        buf = mmap.mmap(fd, int(export["nbytes"]), flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory
    nbytes = math.prod(shape) * dtype.itemsize
    offset = int(export["offset"])
    if offset < 0 or offset + nbytes > len(buf):
        raise ValueError(f"the peer's KV memory holds {len(buf)} bytes, not {nbytes} at offset {offset}")
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def host_id() -> str:
    """This host's boot id: equal in every process (and container) of one running kernel."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
