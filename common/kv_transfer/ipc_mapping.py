"""Mapping a peer's KV cache memory into this process, for the ipc backend (ipc.py).

    server: export(tensors, kind) -> regions          client: mapped_layers(Mapping, layout, device)
      cuda  UntypedStorage._share_cuda_(): the IPC      UntypedStorage._new_shared_cuda() opened on
            handle of the allocation, its ref counter    THIS process's device: a device pointer that
            (torch's), byte offsets                      reads the peer GPU by peer access
      host  host_shm.host_export(): memfd of the pool   host_shm.map_host(): the same host pages

These are the calls torch.multiprocessing.reductions.reduce_tensor / rebuild_cuda_tensor make,
without pickling: each region is a JSON dict in the Mapping header (handles in base64), so a
malformed peer cannot run code here. The export's IPC event is not waited for (event_sync
False): it orders only the export, while KV content is ordered by the lease (granted after the
prefill synchronised its step); it also spares opening an event of a GPU this process may not see.
A stacked cache [L, 2, N, bs, H, D] is one region; separately allocated layers are one each.
"""

from __future__ import annotations

import base64

import torch

from pdserve.common.kv_transfer import host_shm, wire
from pdserve.common.kv_transfer.base import KVLayout
from pdserve.common.kv_transfer.blocks import stacked_view


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def exported_tensors(kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors a server exports: its stacked cache as one, or each separate layer."""
    stacked = stacked_view(kv_caches)
    return [stacked] if stacked is not None else list(kv_caches)


def cuda_export(tensor: torch.Tensor) -> dict:
    (_, handle, storage_nbytes, storage_offset, ref_counter, ref_counter_offset, event,
     _) = tensor.untyped_storage()._share_cuda_()
    return dict(shape=list(tensor.shape), handle=_b64(handle), storage_nbytes=storage_nbytes,
                storage_offset=storage_offset, ref_counter=_b64(ref_counter),
                ref_counter_offset=ref_counter_offset, event=_b64(event),
                offset=tensor.storage_offset() * tensor.element_size())


def map_cuda(region: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The peer's tensor through a CUDA IPC mapping opened on this process's device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    storage = torch.UntypedStorage._new_shared_cuda(
        index, _unb64(region["handle"]), int(region["storage_nbytes"]), int(region["storage_offset"]),
        _unb64(region["ref_counter"]), int(region["ref_counter_offset"]), _unb64(region["event"]), False)
    shape = tuple(int(x) for x in region["shape"])
    nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
    offset = int(region["offset"])
    if offset + nbytes > storage.nbytes():
        raise ValueError(f"the peer's exported memory holds {storage.nbytes()} bytes, not {nbytes} at {offset}")
    raw = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    raw.set_(storage, 0, (storage.nbytes(),), (1,))
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def mapped_layers(mapping: wire.Mapping, layout: KVLayout, device: torch.device) -> list[torch.Tensor]:
    """The server's per-layer caches [2, N, bs, H, D] (uint8 for fp8) as views of this process's
    mapping of its memory; ValueError/RuntimeError/OSError when they cannot be mapped."""
    dtype = torch.uint8 if layout.itemsize == 1 else layout.torch_dtype
    layer_shape = (2, layout.num_blocks, *layout.block_shape)
    if mapping.regions and len(mapping.regions) == 1 and len(mapping.regions[0]["shape"]) == 6:
        expected = [(layout.num_layers, *layer_shape)]
    else:
        expected = [layer_shape] * layout.num_layers
    shapes = [tuple(region["shape"]) for region in mapping.regions]
    if shapes != expected:
        raise ValueError(f"the peer exported tensors shaped {shapes}, its layout says {expected}")
    layers = []
    for region, shape in zip(mapping.regions, shapes):
        if mapping.kind == "cuda":
            tensor = map_cuda(region, dtype, device)
        else:
            tensor = host_shm.map_host(region, shape, dtype)
        layers += list(tensor.unbind(0)) if len(shape) == 6 else [tensor]
    return layers


def export(tensors: list[torch.Tensor], kind: str, host_id: str) -> wire.Mapping:
    """The Mapping header of a server's exported tensors (exported_tensors), kind "cuda" | "host"."""
    if kind == "cuda":
        regions = [cuda_export(t) for t in tensors]
    else:
        regions = [dict(shape=list(t.shape), **host_shm.host_export(t)) for t in tensors]
    return wire.Mapping(host_id, kind, regions)
