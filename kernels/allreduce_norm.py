"""allreduce_add_rms_norm: a tensor-parallel layer's all-reduce, residual add and RMSNorm in ONE kernel.

After a row-parallel projection (o_proj, down_proj) each rank holds a partial sum x_r [T, N]; the
next step is `rms_norm(sum_r x_r, weight, eps, residual)` (kernels/rms_norm.py). Over NVLink peer
memory (torch symmetric memory: every rank's buffer is mapped on every rank) one kernel does it:

    1. each program copies its rows of x into slot RANK of region `region` (0 or 1): push mode (the
       default) into every rank's buffer (NVLink stores are posted: nothing waits for them), pull
       mode into this rank's buffer only
    2. barrier with the same program of every peer (signal pads, below)
    3. each program reads its rows of every slot (push: from its own buffer, local; pull: slot q
       from rank q's buffer, an NVLink round trip), sums them in fp32 in rank order (rounded once
       to the dtype: for 2 ranks the same bits as NCCL's sum), adds the residual and normalises
       exactly as kernels/rms_norm.py does -> out, residual_out

    buffer of every rank:  | region 0: slot 0 | slot 1 | .. | slot W-1 | region 1: slot 0 | .. |

One launch instead of NCCL's all-reduce kernel plus the norm kernel; at decode sizes (a few KiB
per rank) both are latency, so the step saves about a launch and a collective's fixed cost per
call, twice per layer.

Barrier, push mode. Program p of rank r owns slot p * W + r of every rank's signal pad (uint32) and
counts its calls (`epochs`, local). Thread q < W stores the call's epoch into slot p * W + r of
rank q (st.release.sys: the program's data stores into rank q before it; posted, no reply), then
waits (ld.acquire.sys, polling local memory) until its own slot p * W + q has reached the epoch
(a signed difference: a fast peer may already be at the next call's). No slot is reset.

Barrier, pull mode. Program p of rank r owns slot p * W + r of every rank's signal pad (uint32).
Thread q < W of the program sets slot p * W + r on rank q from 0 to 1 (release, system scope; spinning while it is
still 1 from a call the peer has not consumed) and then waits for its own slot p * W + q to be 1 and
resets it to 0 (acquire). A bar.sync before and after orders the program's buffer writes before
its signals and the peers' reads after theirs. Slots are left at 0, so calls need no reset. A
wait longer than `timeout_s` (a peer that died) executes `trap`: the step fails with a CUDA error
(the process's CUDA context is then unusable, as after any device fault) instead of spinning forever.

Buffer reuse. The kernel has no closing barrier: calls alternate between two regions (the caller
passes `region`), and a rank writes region k (its own or, pushing, a peer's) again only in the
call after next, by which time it has passed the barrier of the call in between, i.e. every peer
has started that call and so (same stream, kernels in order) finished reading region k. The
caller guarantees the alternation: the model makes two calls per layer, each forward pass starts
at region 0 (tp_comm.FusedAllReduceNorm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.rms_norm import rms_normalize

SIGNAL_SLOTS = 512  # uint32 slots of the signal pad used: programs * world_size (torch's pad has >= 512)


@triton.jit
def _thread_index():
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


# Compare-and-swap the uint32 at $1 from OLD to NEW, retrying while it holds something else; past
# $2 ns the kernel traps (a dead peer: a CUDA error instead of a hung GPU). NAME keeps the labels
# of the two uses apart.
_CAS_WAIT = """
{{
.reg .u32 %old;
.reg .u64 %start, %now;
.reg .pred %done, %late;
mov.u64 %start, %globaltimer;
{name}_loop:
atom.global.{sem}.sys.cas.b32 %old, [$1], {old}, {new};
setp.eq.u32 %done, %old, {old};
@%done bra {name}_end;
mov.u64 %now, %globaltimer;
sub.u64 %now, %now, %start;
setp.gt.u64 %late, %now, $2;
@%late trap;
bra {name}_loop;
{name}_end:
mov.u32 $0, %old;
}}
"""
# a peer's slot 0 -> 1 (release: this program's buffer writes before it), waiting while still 1
_SIGNAL = tl.constexpr(_CAS_WAIT.format(name="signal", sem="release", old=0, new=1))
# this rank's slot 1 -> 0 (acquire: the peer's writes visible after it)
_CONSUME = tl.constexpr(_CAS_WAIT.format(name="consume", sem="acquire", old=1, new=0))


# PUSH: publish epoch $2 in a peer's slot (release, system scope: this program's stores into the
# peer's buffer before it); a posted store, no reply awaited
_PUBLISH = tl.constexpr("st.release.sys.global.u32 [$1], $2;\nmov.u32 $0, 0;")
# PUSH: wait until this rank's slot $1 reaches epoch $2 (acquire; wrap-safe compare: the peer may
# already be one call further), trapping past $3 ns
_AWAIT = tl.constexpr("""
{
.reg .u32 %v;
.reg .s32 %d;
.reg .u64 %start, %now;
.reg .pred %done, %late;
mov.u64 %start, %globaltimer;
await_loop:
ld.acquire.sys.global.u32 %v, [$1];
sub.s32 %d, %v, $2;
setp.ge.s32 %done, %d, 0;
@%done bra await_end;
mov.u64 %now, %globaltimer;
sub.u64 %now, %now, %start;
setp.gt.u64 %late, %now, $3;
@%late trap;
bra await_loop;
await_end:
mov.u32 $0, %v;
}
""")


@triton.jit
def _cas_wait(address, timeout_ns, ASM: tl.constexpr):
    tl.inline_asm_elementwise(ASM, "=r,l,l", [address, timeout_ns], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _allreduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    own_ptr,                                  # this rank's buffer (as a tensor: aligned, so loads vectorise)
    buffer_addrs_ptr, pad_addrs_ptr,          # int64 [W]: every rank's buffer / signal pad address
    epoch_ptr,                                # PUSH: int32 [SIGNAL_SLOTS // W], this rank's calls per program
    region_start, slot_elems, num_rows, hidden_size, eps, timeout_ns,
    stride_x, stride_residual, stride_out, stride_residual_out,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, ELEMENT_BYTES: tl.constexpr,
    PUSH: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    dtype = x_ptr.dtype.element_ty
    own_addr = tl.load(buffer_addrs_ptr + RANK)
    region = own_ptr + region_start           # slot q of a region: rank q's rows
    for row in range(pid, num_rows, programs):
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
        dst = region + RANK * slot_elems + row.to(tl.int64) * hidden_size + cols
        if PUSH:  # into this rank's slot of every rank's buffer (peer stores are posted: no round trip)
            for q in tl.static_range(WORLD):
                tl.store(dst + _peer_offset(buffer_addrs_ptr, q, own_addr, ELEMENT_BYTES), x, mask=mask)
        else:
            tl.store(dst, x, mask=mask)
    tl.debug_barrier()
    tid = _thread_index()
    if tid < WORLD:
        slot_bytes = 4 * (pid * WORLD).to(tl.int64)
        if PUSH:
            epoch = tl.load(epoch_ptr + pid) + 1
            _publish(tl.load(pad_addrs_ptr + tid) + slot_bytes + 4 * RANK, epoch)
            _await(tl.load(pad_addrs_ptr + RANK) + slot_bytes + 4 * tid.to(tl.int64), epoch, timeout_ns)
            if tid == 0:
                tl.store(epoch_ptr + pid, epoch)
        else:
            _cas_wait(tl.load(pad_addrs_ptr + tid) + slot_bytes + 4 * RANK, timeout_ns, _SIGNAL)
            _cas_wait(tl.load(pad_addrs_ptr + RANK) + slot_bytes + 4 * tid.to(tl.int64), timeout_ns, _CONSUME)
    tl.debug_barrier()
    weight = tl.load(weight_ptr + cols, mask=mask).to(tl.float32)
    for row in range(pid, num_rows, programs):
        r64 = row.to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for q in tl.static_range(WORLD):
            src = region + q * slot_elems + r64 * hidden_size + cols
            if not PUSH:  # pull: rank q's slot of rank q's buffer, over NVLink
                src += _peer_offset(buffer_addrs_ptr, q, own_addr, ELEMENT_BYTES)
            acc += tl.load(src, mask=mask, other=0.0, volatile=True).to(tl.float32)
        reduced = acc.to(dtype)  # what the all-reduce returns
        residual = tl.load(residual_ptr + r64 * stride_residual + cols, mask=mask, other=0.0)
        h = (reduced.to(tl.float32) + residual.to(tl.float32)).to(dtype)  # as rms_norm's residual add
        tl.store(residual_out_ptr + r64 * stride_residual_out + cols, h, mask=mask)
        out = rms_normalize(h, weight, hidden_size, eps)
        tl.store(out_ptr + r64 * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _peer_offset(buffer_addrs_ptr, q, own_addr, ELEMENT_BYTES: tl.constexpr):
    """Rank q's buffer as an element offset from this rank's (mappings are page-aligned: known alignment)."""
    return tl.multiple_of((tl.load(buffer_addrs_ptr + q) - own_addr) // ELEMENT_BYTES, 16)


@triton.jit
def _publish(address, epoch):
    tl.inline_asm_elementwise(_PUBLISH, "=r,l,r", [address, epoch], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _await(address, epoch, timeout_ns):
    tl.inline_asm_elementwise(_AWAIT, "=r,l,r,l", [address, epoch, timeout_ns], dtype=tl.int32, is_pure=False,
                              pack=1)


def allreduce_add_rms_norm(
    x: torch.Tensor,               # [T, N] this rank's partial sum
    residual: torch.Tensor,        # [T, N]
    weight: torch.Tensor,          # [N]
    eps: float,
    own_buffer: torch.Tensor,      # this rank's symmetric buffer: 2 regions x W slots of slot_bytes
    buffer_addrs: torch.Tensor,    # int64 [W] on the device: every rank's symmetric buffer
    pad_addrs: torch.Tensor,       # int64 [W] on the device: every rank's signal pad
    region: int,                   # 0 or 1, alternating from call to call (module doc)
    slot_bytes: int,               # bytes of one rank's slot in a region (>= x's bytes)
    rank: int,
    epochs: torch.Tensor | None = None,  # int32 [SIGNAL_SLOTS // W] zeros at first: push mode; None: pull
    timeout_s: float = 300.0,      # a barrier waiting longer traps (CUDA error): the peer is gone
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual), as kernels/rms_norm.py.
    Every rank must call it with the same shapes, region and mode, in the same order."""
    assert x.dim() == 2 and x.stride(1) == 1 and residual.shape == x.shape and residual.stride(1) == 1
    num_rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.dtype == x.dtype == residual.dtype
    world = buffer_addrs.numel()
    assert x.numel() * x.element_size() <= slot_bytes and slot_bytes % 16 == 0
    assert own_buffer.numel() * own_buffer.element_size() >= 2 * world * slot_bytes and region in (0, 1)
    assert epochs is None or (epochs.dtype == torch.int32 and epochs.numel() >= SIGNAL_SLOTS // world)
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out)
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    slot_elems = slot_bytes // x.element_size()
    _allreduce_add_rms_norm_kernel[(min(num_rows, SIGNAL_SLOTS // world),)](
        x, residual, weight, out, residual_out, own_buffer.view(x.dtype), buffer_addrs, pad_addrs,
        epochs if epochs is not None else buffer_addrs, region * world * slot_elems, slot_elems, num_rows, hidden,
        eps, int(timeout_s * 1e9), x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0),
        RANK=rank, WORLD=world, BLOCK=block, ELEMENT_BYTES=x.element_size(), PUSH=epochs is not None,
        num_warps=min(16, max(4, block // 512)), **pdl.launch_args(x),
    )
    return out, residual_out
