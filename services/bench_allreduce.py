"""The tensor-parallel layer's all-reduce + residual add + RMSNorm on N GPUs: check, then time (issue 12).

    python -m pdserve.services.bench_allreduce [--world-size 2] [--check-only] [--json-out FILE]

One process per GPU (a TPComm with all_reduce="fused", as an engine's ranks have). For hidden
sizes 4096 / 8192 and 1-256 rows (decode batches):

    check   kernels/allreduce_norm.py vs NCCL's all-reduce then kernels/rms_norm.py: the same bits
            for 2 ranks (one rounding of the sum either way), within 1 bf16 ulp for more; then a
            CUDA graph of 64 calls over 64 different inputs (the model's alternation of regions)
            replayed 200 times, every output compared: a missing barrier or a region reused too
            early would read a neighbour's data
    dead    rank 1 stops calling: rank 0's call must fail (trap -> CUDA error) after its timeout
    time    us per call inside a CUDA graph of 64 calls: NCCL all-reduce + norm kernel; torch's
            symm_mem one-shot all-reduce + norm kernel; the fused kernel, push mode (the engine's)
            and pull mode (both checked as above)

Prints a table at the end (rank 0); exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = (4096, 8192)
ROWS = (1, 2, 8, 32, 128, 256)
CALLS = 64


def _rank_main(rank: int, world: int, port: int, check_only: bool, result_path: str) -> None:
    from pdserve.common.engine.tp_comm import FUSED_REGION_BYTES, FusedAllReduceNorm, TPComm
    from pdserve.kernels.rms_norm import rms_norm

    device = torch.device("cuda", rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    comm = TPComm(rank, world, store, device, 60.0, "fused")
    fused = comm._fused  # push mode (the engine's)
    pull = FusedAllReduceNorm(rank, dist.group.WORLD.group_name, device, push=False)
    rows_out, failures = [], []
    symm = None
    if not check_only:
        import torch.distributed._symmetric_memory as symm_mem
        symm = symm_mem.empty(FUSED_REGION_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(symm, dist.group.WORLD.group_name)
    for hidden in HIDDEN:
        weight = (1 + 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16).to(device)
        for rows in ROWS:
            if rows * hidden * 2 > FUSED_REGION_BYTES:
                continue
            gen = torch.Generator().manual_seed(1000 * rows + hidden + 7 * rank)
            xs = [torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).to(device) for _ in range(CALLS)]
            res = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16).to(device)

            def reference(i):
                y = xs[i].clone()
                dist.all_reduce(y)
                return rms_norm(y, weight, 1e-5, res)

            refs = [reference(i) for i in range(CALLS)]
            exact = world == 2
            bad = 0
            for kernel in (fused, pull):
                eager = [kernel(xs[i], res, weight, 1e-5, i % 2) for i in range(CALLS)]
                bad += _compare(refs, eager, exact)
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    outs = [kernel(xs[i], res, weight, 1e-5, i % 2) for i in range(CALLS)]
                for _ in range(200):
                    graph.replay()
                torch.cuda.synchronize()
                bad += _compare(refs, outs, exact)
            if bad:
                failures.append(f"hidden {hidden} rows {rows}: {bad} outputs differ from NCCL + rms_norm")
            row = {"hidden": hidden, "rows": rows, "check": "ok" if not bad else f"{bad} differ"}
            if not check_only:
                row["nccl_us"] = _graph_us(lambda i: rms_norm(_nccl(xs[i]), weight, 1e-5, res))
                group = dist.group.WORLD.group_name
                row["symm_us"] = _graph_us(lambda i: rms_norm(torch.ops.symm_mem.one_shot_all_reduce_copy(
                    symm.view(torch.bfloat16)[:rows * hidden].view(rows, hidden), xs[i], "sum", group),
                    weight, 1e-5, res))
                row["fused_us"] = _graph_us(lambda i: fused(xs[i], res, weight, 1e-5, i % 2))
                row["fused_pull_us"] = _graph_us(lambda i: pull(xs[i], res, weight, 1e-5, i % 2))
            rows_out.append(row)
    dist.barrier()
    torch.cuda.synchronize()
    dead_peer = None
    if rank == 0:
        # rank 1 makes no call: the barrier must give up (trap -> CUDA error), not spin forever
        from pdserve.kernels.allreduce_norm import allreduce_add_rms_norm
        x = torch.randn(1, 4096, device=device).to(torch.bfloat16)
        t0 = time.perf_counter()
        try:
            allreduce_add_rms_norm(x, x, torch.ones(4096, dtype=torch.bfloat16, device=device), 1e-5, fused.buffer,
                                   fused.buffer_addrs, fused.pad_addrs, 0, FUSED_REGION_BYTES, rank, fused.epochs,
                                   timeout_s=2.0)
            torch.cuda.synchronize()
            dead_peer = "returned"
            failures.append("a call without its peer returned instead of failing")
        except Exception as e:  # the trap surfaces as a CUDA error at the sync
            dead_peer = f"failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {str(e)[:80]}"
        with open(result_path, "w") as f:
            json.dump({"rows": rows_out, "failures": failures, "dead_peer": dead_peer}, f)
        os._exit(0)  # the CUDA context is unusable after the trap: no teardown
    time.sleep(8)
    os._exit(0)


def _nccl(x):
    y = x.clone()
    dist.all_reduce(y)
    return y


def _compare(refs, outs, exact: bool) -> int:
    bad = 0
    for (r_out, r_res), (o_out, o_res) in zip(refs, outs):
        if exact:
            bad += not (torch.equal(r_out, o_out) and torch.equal(r_res, o_res))
        else:
            bad += not (torch.allclose(r_out.float(), o_out.float(), rtol=1e-2, atol=1e-2)
                        and torch.allclose(r_res.float(), o_res.float(), rtol=1e-2, atol=1e-2))
    return bad


def _graph_us(fn) -> float:
    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier()
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(1000 * start.elapsed_time(end) / (20 * CALLS), 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench allreduce", description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--check-only", action="store_true", help="correctness only (the GPU test)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.world_size:
        print(f"bench allreduce: needs {args.world_size} CUDA devices, found {torch.cuda.device_count()}",
              file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_path = args.json_out or os.path.join("/tmp", f"pdserve-allreduce-{os.getpid()}.json")
    mp.spawn(_rank_main, args=(args.world_size, port, args.check_only, result_path), nprocs=args.world_size)
    with open(result_path) as f:
        result = json.load(f)
    print(f"\n== all-reduce + residual add + RMSNorm, {args.world_size} x {torch.cuda.get_device_name(0)}, "
          f"bf16, us per call in a CUDA graph of {CALLS} ==")
    print(f"{'hidden':>6} {'rows':>5} {'check':<10} {'nccl+norm':>9} {'symm+norm':>9} {'fused':>7} {'pull':>7}")
    for r in result["rows"]:
        print(f"{r['hidden']:>6} {r['rows']:>5} {r['check']:<10} {r.get('nccl_us', '-'):>9} "
              f"{r.get('symm_us', '-'):>9} {r.get('fused_us', '-'):>7} {r.get('fused_pull_us', '-'):>7}")
    print(f"a call whose peer never comes (timeout 2 s): {result.get('dead_peer')}")
    for f in result["failures"]:
        print("FAILED:", f)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
