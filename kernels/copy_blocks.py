"""copy_blocks: move whole KV blocks between a paged cache and a staging buffer, all layers at once.

    src  [R, Ns, E]   R rows (layer x K/V), Ns blocks of E elements each (E contiguous)
    dst  [R, Nd, E]
    src_ids [n] / dst_ids [n]: int32/int64 block ids, or None for 0..n-1

    dst[:, dst_ids[j]] = src[:, src_ids[j]]   for j in 0..n-1, every row

A KV handoff gathers a lease's blocks of every layer from the cache [L, 2, N, bs, H, D] into a
layer-major staging buffer [L, 2, n, bs, H, D] (src_ids = the lease, dst_ids = None) and the
receiver scatters them back (src_ids = None, dst_ids = its blocks): one launch per handoff.
One program copies one block of one row (E elements, 32 KiB for Llama-3-8B bf16) in CHUNK-sized
vector loads, so the kernel streams at memory bandwidth whatever the id order; torch's
index_select / index_copy_ along dim 2 compute an offset per element instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src_row, stride_src_block, stride_dst_row, stride_dst_block,
    BLOCK_ELEMS: tl.constexpr, CHUNK: tl.constexpr,
    HAS_SRC_IDS: tl.constexpr, HAS_DST_IDS: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    if HAS_SRC_IDS:
        src_block = tl.load(src_ids_ptr + j).to(tl.int64)
    else:
        src_block = j
    if HAS_DST_IDS:
        dst_block = tl.load(dst_ids_ptr + j).to(tl.int64)
    else:
        dst_block = j
    src = src_ptr + row * stride_src_row + src_block * stride_src_block
    dst = dst_ptr + row * stride_dst_row + dst_block * stride_dst_block
    for start in range(0, BLOCK_ELEMS, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < BLOCK_ELEMS
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_blocks(
    src: torch.Tensor,                   # [R, Ns, E]
    dst: torch.Tensor,                   # [R, Nd, E]
    src_ids: torch.Tensor | None,        # [n] int32/int64, or None: 0..n-1
    dst_ids: torch.Tensor | None,        # [n] int32/int64, or None: 0..n-1
) -> None:
    assert src.dim() == 3 and dst.dim() == 3, f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must be [R, N, E]"
    assert src.shape[0] == dst.shape[0] and src.shape[2] == dst.shape[2], \
        f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in rows or block elements"
    assert src.dtype == dst.dtype, f"src {src.dtype} and dst {dst.dtype} differ"
    assert src.stride(2) == 1 and dst.stride(2) == 1, "blocks must be contiguous"
    assert src_ids is not None or dst_ids is not None, "give src_ids, dst_ids or both"
    ids = [i for i in (src_ids, dst_ids) if i is not None]
    num = ids[0].numel()
    for i in ids:
        assert i.dim() == 1 and i.numel() == num, "src_ids and dst_ids must be [n] of one length"
        assert i.dtype in (torch.int32, torch.int64) and i.device == src.device, "ids: int32/int64 on the device"
    if src_ids is None:
        assert num <= src.shape[1], f"{num} blocks but src holds {src.shape[1]}"
    if dst_ids is None:
        assert num <= dst.shape[1], f"{num} blocks but dst holds {dst.shape[1]}"
    rows, _, elems = src.shape
    if num == 0 or rows == 0:
        return
    dummy = ids[0]
    _copy_blocks_kernel[(num, rows)](
        src, dst, src_ids if src_ids is not None else dummy, dst_ids if dst_ids is not None else dummy,
        src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        BLOCK_ELEMS=elems, CHUNK=min(4096, triton.next_power_of_2(elems)),
        HAS_SRC_IDS=src_ids is not None, HAS_DST_IDS=dst_ids is not None, num_warps=4,
    )
