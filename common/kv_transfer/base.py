"""The KV transfer interface: a prefill worker serves leased blocks, a decode worker pulls them.

    prefill worker (KVServer)                          decode worker (KVClient)
    kv [L, 2, num_blocks, block_size, H, D]            kv [L, 2, num_blocks', block_size, H, D]
    (one tensor, or a list of per-layer [2, num_blocks, block_size, H, D] tensors)
         |  resolve_lease(lease_id) -> src_block_ids        ^
         |  gather src_block_ids[offset:] of all layers     |  scatter into dst_block_ids
         v  into one staging buffer (blocks.py)             |
    staging [L, 2, n, block_size, H, D] ===== wire =====> staging [L, 2, n, block_size, H, D]

A pull is one request/response on a pooled connection (pipeline.py): the client sends
(lease_id, src_block_offset, n), the server resolves the lease, checks that the lease's blocks
after the offset number exactly n, and answers a header and then the n blocks' bytes, streamed
in a few large chunks. Block ids differ between the workers; only the layout (everything but
num_blocks) must match, and it is compared on the first message of every connection.

Tensor parallelism: a rank's cache holds only its KV heads, so a layout also names its shard
(first_kv_head, and the model's total_kv_heads). A client may pull a shard other than its own
(`pull(..., source=SourceShard)`, tp_reshard.py): it then says in its Hello the layout it
expects the server to hold, receives whole blocks of that shard and copies the head runs it
needs into its cache (the re-shard between prefill TP=a and decode TP=b, tp_pull.py).

Backends: tcp.py (asyncio sockets), ucx.py (ucxx: tcp on CPU, cuda_ipc/cuda_copy on GPU),
nccl.py (a 2-rank NCCL group per prefill-decode pair; gloo on CPU), ipc.py (same host: the
client reads the server's cache through a CUDA IPC / shared-memory mapping, no staging),
local.py (same process).
make_server / make_client pick one by name.

Errors: a pull that cannot complete (peer gone, lease expired or unknown, layout mismatch,
deadline passed) raises `KVTransferError`, which the decode worker answers by recomputing the
prefill. Bad arguments from the caller (duplicate or out-of-range destination ids) raise
`ValueError`: they are bugs, not transfer failures.

Counters are plain attributes that the worker exports as metrics:
`bytes_sent` (server) / `bytes_received` (client), `seconds`, `num_transfers`, `num_failures`,
and `phases` (PullPhases: where the time of pulls went, per end).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdserve.common.kv_transfer import BACKENDS  # noqa: F401 (re-export)

if TYPE_CHECKING:
    from pdserve.common.kv_transfer.blocks import BlockCopier


# A deadline is a relative budget in seconds. Anything above an hour is almost surely an
# absolute time.monotonic() value passed by mistake, which would make a dead peer hang.
MAX_DEADLINE_S = 3600.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": torch.float8_e4m3fn}

# Fields that must agree between the two workers (num_blocks is each pool's own size): the model's
# KV heads and the shard's, not only the head count of the tensors.
_PEER_FIELDS = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "kv_scales", "total_kv_heads",
                "first_kv_head")


class KVTransferError(RuntimeError):
    """A pull failed: peer gone, lease unknown or expired, layout mismatch, deadline passed."""


# lease id -> its block ids (None: unknown or expired), or an awaitable of them (a tensor-parallel
# rank > 0 asks rank 0, which holds the one lease table: tp_agent.py)
LeaseResolver = Callable[[str], "list[int] | None | Awaitable[list[int] | None]"]
KVHeads = tuple[int, int]  # (first KV head of a tensor-parallel shard, the model's KV heads)


@dataclass
class PullPhases:
    """Where the time of one end's pulls went, summed over pulls (bench.py shows it per pull).

        server  copy = gather into staging         wire = awaiting the payload sends
        client  copy = scatter out of staging      wire = awaiting the payload receives
                request = PullRequest sent -> PullReply received (a control round trip)

    copy_s is host time from the first launch until the copies are done; on CUDA copy_gpu_s is
    their GPU time (CUDA events), so copy_s - copy_gpu_s is launch and hand-off overhead.
    payload_messages counts payload chunks (each pull also has two headers).
    """

    request_s: float = 0.0
    copy_s: float = 0.0
    copy_gpu_s: float = 0.0
    wire_s: float = 0.0
    payload_messages: int = 0


@dataclass(frozen=True)
class KVLayout:
    """One worker's (or tensor-parallel rank's) paged KV cache: num_layers tensors
    [2, num_blocks, block_size, H, D], H = num_kv_heads, the model's KV heads
    first_kv_head .. first_kv_head + H - 1 of total_kv_heads (all of them without TP)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16" | "float8_e4m3fn"
    first_kv_head: int = 0
    total_kv_heads: int | None = None  # None: num_kv_heads (the cache holds every KV head)
    # fp8 caches: every layer's [2, KVH] scales flattened (the tensors' `kv_scale`); blocks
    # quantized with other scales would decode wrongly, so peers must agree on them exactly
    kv_scales: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.total_kv_heads is None:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)
        for field in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim",
                      "total_kv_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{field} must be a positive int, got {value!r}")
        first = self.first_kv_head
        if (not isinstance(first, int) or isinstance(first, bool) or first < 0
                or first + self.num_kv_heads > self.total_kv_heads):
            raise ValueError(f"KVLayout.first_kv_head={first!r} with {self.num_kv_heads} heads does "
                             f"not fit in total_kv_heads={self.total_kv_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return (self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * self.itemsize)

    @classmethod
    def from_caches(cls, kv_caches: list[torch.Tensor], kv_heads: KVHeads | None = None) -> KVLayout:
        """Reads and checks the layout of a worker's cache: equal, contiguous, supported tensors.
        kv_heads: (first KV head, the model's KV heads) of a tensor-parallel rank's shard."""
        if isinstance(kv_caches, torch.Tensor):
            stacked_scales = getattr(kv_caches, "kv_scale", None)  # fp8: [L, 2, KVH] (model_runner.py)
            kv_caches = layer_views(kv_caches)
            for kv, scale in zip(kv_caches, stacked_scales if stacked_scales is not None else []):
                kv.kv_scale = scale
        if not kv_caches:
            raise ValueError("kv_caches is empty: expected one tensor per layer")
        first = kv_caches[0]
        dtype_names = {v: k for k, v in _DTYPES.items()}
        if first.dtype not in dtype_names:
            raise ValueError(f"kv cache dtype {first.dtype} is not one of {sorted(_DTYPES)}")
        if first.dim() != 5 or first.shape[0] != 2:
            raise ValueError("kv_caches[0] must be shaped [2, num_blocks, block_size, "
                             f"num_kv_heads, head_dim], got {tuple(first.shape)}")
        for layer, kv in enumerate(kv_caches):
            if kv.shape != first.shape or kv.dtype != first.dtype or kv.device != first.device:
                raise ValueError(
                    f"kv_caches[{layer}] is {tuple(kv.shape)} {kv.dtype} on {kv.device}, but "
                    f"kv_caches[0] is {tuple(first.shape)} {first.dtype} on {first.device}")
            if not kv.is_contiguous():
                raise ValueError(f"kv_caches[{layer}] must be contiguous")
        _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
        scales = [getattr(kv, "kv_scale", None) for kv in kv_caches]
        kv_scales = None
        if first.dtype == torch.float8_e4m3fn:
            if any(s is None for s in scales):
                raise ValueError("fp8 kv_caches must carry their scales (tensor attribute kv_scale)")
            kv_scales = tuple(float(x) for s in scales for x in s.flatten().tolist())
        first_kv_head, total_kv_heads = kv_heads or (0, None)
        return cls(len(kv_caches), num_blocks, block_size, num_kv_heads, head_dim,
                   dtype_names[first.dtype], first_kv_head, total_kv_heads, kv_scales)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVLayout:
        try:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "kv_scales"}
            scales = data.get("kv_scales")
            return cls(**fields, kv_scales=None if scales is None else tuple(float(x) for x in scales))
        except (KeyError, TypeError) as e:
            raise KVTransferError(f"peer sent a malformed KV layout {data!r}: {e}") from e

    def check_peer(self, peer: KVLayout, peer_name: str) -> None:
        """Raises KVTransferError naming the first field where the peer's layout differs."""
        for field in _PEER_FIELDS:
            mine, theirs = getattr(self, field), getattr(peer, field)
            if field == "kv_scales" and mine != theirs:  # long tuples: say how they differ
                raise KVTransferError(f"KV layout mismatch with {peer_name}: fp8 KV scales differ "
                                      f"({'none' if mine is None else len(mine)} here, "
                                      f"{'none' if theirs is None else len(theirs)} there, or other values)")
            if mine != theirs:
                raise KVTransferError(
                    f"KV layout mismatch with {peer_name}: {field} is {mine!r} here but "
                    f"{theirs!r} there")


def layer_views(kv_caches: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """The per-layer [2, N, block_size, H, D] tensors of a cache given as a list of them or as the
    engine's one tensor [L, 2, N, block_size, H, D] (then views of it)."""
    if isinstance(kv_caches, torch.Tensor):
        if kv_caches.dim() != 6:
            raise ValueError("a KV cache tensor must be shaped [num_layers, 2, num_blocks, "
                             f"block_size, num_kv_heads, head_dim], got {tuple(kv_caches.shape)}")
        return list(kv_caches.unbind(0))
    return list(kv_caches)


def check_block_ids(block_ids: list[int], num_blocks: int, what: str) -> None:
    """Raises ValueError unless every id is an int in [0, num_blocks)."""
    for block_id in block_ids:
        if not isinstance(block_id, int) or isinstance(block_id, bool) or not (
                0 <= block_id < num_blocks):
            raise ValueError(f"{what} holds {block_id!r}, not a block id in [0, {num_blocks})")


def split_address(address: str, scheme: str) -> tuple[str, int]:
    """"tcp://127.0.0.1:5000" -> ("127.0.0.1", 5000); ValueError for another scheme or form."""
    prefix = f"{scheme}://"
    if not address.startswith(prefix):
        raise ValueError(f"address {address!r} is not a {scheme} KV address ({prefix}host:port)")
    host, sep, port = address[len(prefix):].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not of the form {prefix}host:port")
    return host.strip("[]"), int(port)


class KVServer(ABC):
    """Serves the blocks of leases to pulling clients. Runs in the prefill worker."""

    scheme: str

    def __init__(self, kv_caches: list[torch.Tensor], resolve_lease: LeaseResolver,
                 host: str = "127.0.0.1", port: int = 0, kv_heads: KVHeads | None = None):
        self.layout = KVLayout.from_caches(kv_caches, kv_heads)  # before the views: a stacked cache carries its fp8 scales
        self.kv_caches = kv_caches = layer_views(kv_caches)
        self.resolve_lease = resolve_lease
        self.host = host
        self.port = port
        self.address: str | None = None  # set by start()
        self.bytes_sent = 0
        self.seconds = 0.0
        self.num_transfers = 0
        self.num_failures = 0
        self.phases = PullPhases()

    @abstractmethod
    async def start(self) -> str:
        """Starts serving; returns the address that clients pull from."""

    @abstractmethod
    async def close(self) -> None:
        """Stops serving and drops every connection; pending pulls fail on the client side."""

    async def src_block_ids_for(self, lease_id: str, src_block_offset: int, num_blocks: int) -> list[int]:
        """The source blocks of one pull, or KVTransferError with the reason sent to the client."""
        src_block_ids = self.resolve_lease(lease_id)
        if inspect.isawaitable(src_block_ids):
            src_block_ids = await src_block_ids
        if src_block_ids is None:
            raise KVTransferError(f"lease {lease_id!r} expired or unknown on the prefill worker")
        num_available = len(src_block_ids) - src_block_offset
        if not 0 <= src_block_offset <= len(src_block_ids) or num_available != num_blocks:
            raise KVTransferError(
                f"lease {lease_id!r} holds {len(src_block_ids)} blocks; src_block_offset="
                f"{src_block_offset} leaves {max(num_available, 0)}, but the client asked for "
                f"{num_blocks} (len(dst_block_ids) must equal the blocks after the offset)")
        src_block_ids = list(src_block_ids[src_block_offset:])
        check_block_ids(src_block_ids, self.layout.num_blocks, f"lease {lease_id!r}")
        return src_block_ids

    def record(self, nbytes: int, seconds: float) -> None:
        self.bytes_sent += nbytes
        self.seconds += seconds
        self.num_transfers += 1


class KVClient(ABC):
    """Pulls leased blocks from KVServers into this worker's cache. Runs in the decode worker."""

    scheme: str

    def __init__(self, kv_caches: list[torch.Tensor], kv_heads: KVHeads | None = None):
        self.layout = KVLayout.from_caches(kv_caches, kv_heads)  # before the views: a stacked cache carries its fp8 scales
        self.kv_caches = kv_caches = layer_views(kv_caches)
        self._copier: BlockCopier  # set by the backend: this cache's own blocks, whole
        self._shard_copiers: dict = {}  # SourceShard -> its HeadRunCopier (tp_reshard.py)
        self.bytes_received = 0
        self.seconds = 0.0
        self.num_transfers = 0
        self.num_failures = 0
        self.phases = PullPhases()

    async def pull(self, address: str, lease_id: str, dst_block_ids: list[int],
                   deadline_s: float, src_block_offset: int = 0, source=None) -> int:
        """Copies the lease's blocks [src_block_offset:] into dst_block_ids; returns bytes moved.

        deadline_s is the time budget of this pull in seconds, relative to now. Raises
        KVTransferError when the pull cannot complete within it. source (a tp_reshard.SourceShard):
        the server holds another tensor-parallel shard; its layout is what the server must
        have, and only its head runs are copied into this cache (None: the same layout as here).
        """
        check_block_ids(dst_block_ids, self.layout.num_blocks, "dst_block_ids")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise ValueError("dst_block_ids holds duplicates: each block may be written once")
        if not isinstance(src_block_offset, int) or src_block_offset < 0:
            raise ValueError(f"src_block_offset must be an int >= 0, got {src_block_offset!r}")
        if not 0 < deadline_s <= MAX_DEADLINE_S:
            raise ValueError(f"deadline_s is a budget in seconds from now, in (0, "
                             f"{MAX_DEADLINE_S:.0f}], got {deadline_s!r}")
        copier = self._copier_for(source)
        start = time.perf_counter()
        try:
            nbytes = await asyncio.wait_for(
                self._pull(address, lease_id, list(dst_block_ids), src_block_offset,
                           start + deadline_s, copier),
                timeout=deadline_s)
        except TimeoutError:
            self.num_failures += 1
            raise KVTransferError(f"pull of lease {lease_id!r} from {address} missed its "
                                  f"deadline of {deadline_s:.3f} s") from None
        except KVTransferError:
            self.num_failures += 1
            raise
        self.bytes_received += nbytes
        self.seconds += time.perf_counter() - start
        self.num_transfers += 1
        return nbytes

    def _copier_for(self, source) -> BlockCopier:
        """This cache's copier, or the one that receives `source`'s shard into it (made once)."""
        if source is None or source.is_identity(self.layout):
            return self._copier
        copier = self._shard_copiers.get(source)
        if copier is None:
            copier = self._shard_copiers[source] = source.copier(self.kv_caches, self.phases)
        return copier

    @abstractmethod
    async def _pull(self, address: str, lease_id: str, dst_block_ids: list[int],
                    src_block_offset: int, deadline: float, copier: BlockCopier) -> int:
        """Backend part of pull(): arguments are checked; deadline is a time.perf_counter() value.
        copier receives the payload: its layout is the one to announce in the Hello (the
        server's), and it scatters into this cache.

        Must raise KVTransferError (never a transport exception) for every transfer failure.
        """

    @abstractmethod
    async def close(self) -> None:
        """Closes every pooled connection."""


def make_server(backend: str, kv_caches: list[torch.Tensor], resolve_lease: LeaseResolver,
                host: str = "127.0.0.1", port: int = 0, **options) -> KVServer:
    """Builds the KVServer of `backend` (one of BACKENDS); options go to its constructor."""
    return _backend_class(backend, "server")(kv_caches, resolve_lease, host, port, **options)


def make_client(backend: str, kv_caches: list[torch.Tensor], **options) -> KVClient:
    """Builds the KVClient of `backend` (one of BACKENDS); options go to its constructor."""
    return _backend_class(backend, "client")(kv_caches, **options)


def _backend_class(backend: str, role: str) -> type:
    # Imported on demand so that the tcp and local backends work without ucxx installed.
    if backend == "tcp":
        from pdserve.common.kv_transfer import tcp as module
    elif backend == "ucx":
        from pdserve.common.kv_transfer import ucx as module
    elif backend == "nccl":
        from pdserve.common.kv_transfer import nccl as module
    elif backend == "ipc":
        from pdserve.common.kv_transfer import ipc as module
    elif backend == "local":
        from pdserve.common.kv_transfer import local as module
    else:
        raise ValueError(f"unknown KV transfer backend {backend!r}; expected one of {BACKENDS}")
    return module.SERVER if role == "server" else module.CLIENT
