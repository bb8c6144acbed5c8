"""Benchmark of KV handoffs between two processes: each backend against raw baselines.

    python -m pdserve.common.kv_transfer.bench [--device cuda] [--size-mb 256] [--backends tcp,ucx,nccl,ipc]
        [--server-gpu 0 --client-gpu 1] [--json-out F]

    main process (decode side)                       spawned process (prefill side)
      KVClient per backend  ---- pull(lease) ---->   KVServer per backend (one event loop)
      blocking socket       ---- size, recv_into <-  raw socket thread: sendall of a buffer
      (cuda) shared tensor .copy_  <-- CUDA IPC --   torch.multiprocessing-shared CUDA tensor

The cache has the shape of Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16, 16-token
blocks: 2 MiB a block, 256 MiB for a 2048-token prompt). Each handoff size becomes a whole
number of blocks (at least one), leased in shuffled order, so gather and scatter take their
index path. A pull is timed end to end (request, gather, wire, scatter); the first pull of each
size on a fresh connection is reported apart as "cold". The raw socket moves the same bytes
with no gather/scatter or headers: it is the ceiling of the tcp-based backends on this host;
with --device cuda, a plain copy_ from the other process's CUDA tensor (CUDA IPC) is the
ceiling of the GPU ones.

With --server-gpu/--client-gpu each side sees only its GPU (CUDA_VISIBLE_DEVICES, as `pdserve up
--prefill-devices/--decode-devices` runs workers) and the ceiling is instead a plain copy_ from
one GPU to the other in a third process that sees both ("p2p-copy"), measured in the same run.
On CUDA the client also times its gather and scatter of the largest handoff with each copy
kernel ("gather-torch" / "gather-triton" / "scatter-*": one index op vs copy_blocks over the
stacked cache, GB/s of payload).

A second table splits the timed pulls into phases (means per pull, from both ends' PullPhases,
base.py; the server's are fetched from its process):

    request    client: PullRequest sent -> PullReply received (control round trip)
    gather     server: host time of the gather, launch to done; [gpu] its GPU time (CUDA events)
    send       server: awaiting the payload sends
    recv       client: awaiting the payload receives (with one chunk this includes the
               server's gather, which runs while the reply travels)
    scatter    client: host time of the scatter; [gpu] its GPU time
    other      client total - request - recv - scatter: thread and event-loop hand-offs, Python;
               negative when several chunks let the scatter overlap the receives
    msgs       messages per pull: two headers and the payload chunks

ipc (one-sided, ipc.py) has no gather, send or payload: its row reads request = PullRequest ->
PullSource round trip, scatter = the client's copy out of its mapping of the server's cache
(one copy_blocks kernel on CUDA) and [gpu] its GPU time, recv = the PullDone round trip (the
lease check after the copy: 0 when the server's leases announce their expiry, as a worker's
do; --ipc-lease-check makes every pull check), other = the rest (the hand-off to the pull's
worker thread and back); msgs counts the request and its answer only.

The "% ceil" column is each row's GB/s as a share of the ceiling measured in the same run for
the same size: p2p-copy (two GPUs), else cuda-ipc-copy (one GPU), else raw-socket (CPU).

Prints the two tables and then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing
import os
import socket
import statistics
import struct
import threading
import time

import torch

from pdserve.common.kv_transfer.base import KVLayout, PullPhases, make_client, make_server

LLAMA3_8B = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128)
SMALL_SIZES_MB = (1, 16)
_SIZE = struct.Struct("!Q")


def _caches(num_blocks: int, device: str, seed: int) -> torch.Tensor:
    """One [L, 2, N, block_size, H, D] tensor, as the engine allocates its cache."""
    generator = torch.Generator().manual_seed(seed)
    shape = (LLAMA3_8B["num_layers"], 2, num_blocks, LLAMA3_8B["block_size"],
             LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"])
    return torch.randn(shape, generator=generator).to(torch.bfloat16).to(device)


def _raw_socket_server(listen_sock: socket.socket, payload: memoryview) -> None:
    """Answers each 8-byte size request with that many bytes of payload, until EOF."""
    conn, _ = listen_sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(_SIZE.size)
    while conn.recv_into(header, _SIZE.size, socket.MSG_WAITALL) == _SIZE.size:
        (nbytes,) = _SIZE.unpack(header)
        conn.sendall(payload[:nbytes])
    conn.close()


def _lease_remaining(seconds: float):
    """What a worker's lease table tells the ipc server: every lease holds for `seconds` more."""
    return lambda lease_id: seconds


def _server_options(backend: str, ipc_lease_check: bool) -> dict:
    """ipc as a worker runs it (its leases announce the default --lease-ttl of 30 s, so a fast copy
    skips the PullDone check), or with ipc_lease_check as a server that knows no expiry."""
    if backend != "ipc" or ipc_lease_check:
        return {}
    return {"lease_remaining": _lease_remaining(30.0)}


def _prefill_side(device: str, num_blocks: int, backends: list[str], leases: dict,
                  max_bytes: int, info, commands, visible_gpu: str | None = None,
                  ipc_lease_check: bool = False) -> None:
    """The spawned process: KV servers for each backend, a raw socket server, a CUDA buffer.

    Serves until the "stop" command; answers the command ("phases", backend) with that
    server's PullPhases as a dict on `info`.
    """
    if visible_gpu is not None:  # before the first CUDA call of this (spawned) process
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu
    if device.startswith("cuda:"):  # --unmasked: this side's GPU among all (ucxx uses the current one)
        torch.cuda.set_device(device)
    listen_sock = socket.create_server(("127.0.0.1", 0))
    raw_payload = torch.ones(max_bytes, dtype=torch.uint8)  # touched: no page faults in timing
    threading.Thread(target=_raw_socket_server, daemon=True,
                     args=(listen_sock, memoryview(raw_payload.numpy()))).start()
    shared = None
    if device == "cuda" and visible_gpu is None:  # one GPU for both sides: the CUDA IPC ceiling
        shared = torch.ones(max_bytes, dtype=torch.uint8, device="cuda")

    async def serve():
        caches = _caches(num_blocks, device, seed=0)
        if "ipc" in backends and caches.device.type == "cpu":  # ipc maps a CPU cache from a memfd
            from pdserve.common.kv_transfer.host_shm import shared_zeros
            caches = shared_zeros(tuple(caches.shape), caches.dtype).copy_(caches)
        servers = [make_server(backend, caches, leases.get, **_server_options(backend, ipc_lease_check))
                   for backend in backends]
        addresses = {backend: await server.start() for backend, server in zip(backends, servers)}
        info.put(dict(addresses=addresses, raw_port=listen_sock.getsockname()[1],
                      cuda_buffer=shared))
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, commands.get)) != "stop":
            _, backend = command
            info.put(dataclasses.asdict(servers[backends.index(backend)].phases))
        for server in servers:
            await server.close()

    asyncio.run(serve())


async def _bench_backend(backend: str, address: str, sizes: list[tuple[int, str]],
                         num_blocks: int, device: str, repeats: int, server_phases) -> list[dict]:
    """Pulls each size once cold, then `repeats` times; server_phases(backend) -> PullPhases."""
    client = make_client(backend, _caches(num_blocks, device, seed=1))
    dst_order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(2)).tolist()
    rows = []
    try:
        for n, lease_id in sizes:
            dst_block_ids = dst_order[:n]
            start = time.perf_counter()
            nbytes = await client.pull(address, lease_id, dst_block_ids, deadline_s=120.0)
            cold_s = time.perf_counter() - start
            client_before = dataclasses.replace(client.phases)
            server_before = await asyncio.to_thread(server_phases, backend)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                await client.pull(address, lease_id, dst_block_ids, deadline_s=120.0)
                times.append(time.perf_counter() - start)
            server_after = await asyncio.to_thread(server_phases, backend)
            row = _row(backend, n, nbytes, times, cold_s)
            row["phases"] = _phases(times, _minus(client.phases, client_before),
                                    _minus(server_after, server_before))
            rows.append(row)
    finally:
        await client.close()
    return rows


def _minus(after: PullPhases, before: PullPhases) -> PullPhases:
    return PullPhases(**{field.name: getattr(after, field.name) - getattr(before, field.name)
                         for field in dataclasses.fields(PullPhases)})


def _phases(times: list[float], client: PullPhases, server: PullPhases) -> dict:
    """Means per pull, in ms (see the module doc)."""
    pulls = len(times)
    total_ms = sum(times) / pulls * 1e3
    ms = {name: seconds / pulls * 1e3 for name, seconds in [
        ("request", client.request_s), ("gather", server.copy_s),
        ("gather_gpu", server.copy_gpu_s), ("send", server.wire_s),
        ("recv", client.wire_s), ("scatter", client.copy_s),
        ("scatter_gpu", client.copy_gpu_s)]}
    return dict(total_ms=total_ms, **{f"{name}_ms": value for name, value in ms.items()},
                other_ms=total_ms - ms["request"] - ms["recv"] - ms["scatter"],
                messages=2 + client.payload_messages / pulls)


def _bench_raw_socket(port: int, sizes: list[tuple[int, str]], bytes_per_block: int,
                      repeats: int) -> list[dict]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = torch.zeros(max(n for n, _ in sizes) * bytes_per_block, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    rows = []
    for n, _ in sizes:
        nbytes = n * bytes_per_block
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sock.sendall(_SIZE.pack(nbytes))
            received = 0
            while received < nbytes:
                received += sock.recv_into(view[received:nbytes], nbytes - received)
            times.append(time.perf_counter() - start)
        rows.append(_row("raw-socket", n, nbytes, times[1:], times[0]))
    sock.close()
    return rows


def _bench_cuda_ipc(shared: torch.Tensor, sizes: list[tuple[int, str]], bytes_per_block: int,
                    repeats: int) -> list[dict]:
    dst = torch.empty_like(shared)
    rows = []
    for n, _ in sizes:
        nbytes = n * bytes_per_block
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst[:nbytes].copy_(shared[:nbytes])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append(_row("cuda-ipc-copy", n, nbytes, times[1:], times[0]))
    return rows


def _p2p_copy_side(src_gpu: str, dst_gpu: str, sizes: list[int], repeats: int, out) -> None:
    """A spawned process that sees both GPUs: a plain copy_ of each size from one to the other."""
    os.environ["CUDA_VISIBLE_DEVICES"] = f"{src_gpu},{dst_gpu}"
    src = torch.ones(max(sizes), dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(max(sizes), dtype=torch.uint8, device="cuda:1")
    times = {}
    for nbytes in sizes:
        runs = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            start = time.perf_counter()
            dst[:nbytes].copy_(src[:nbytes])
            torch.cuda.synchronize("cuda:1")
            runs.append(time.perf_counter() - start)
        times[nbytes] = runs
    out.put(times)


def _bench_p2p_copy(server_gpu: str, client_gpu: str, sizes: list[tuple[int, str]],
                    bytes_per_block: int, repeats: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    nbytes = [n * bytes_per_block for n, _ in sizes]
    process = context.Process(target=_p2p_copy_side, args=(server_gpu, client_gpu, nbytes, repeats, out))
    process.start()
    times = out.get(timeout=300)
    process.join(timeout=30)
    return [_row("p2p-copy", n, n * bytes_per_block, times[n * bytes_per_block][1:],
                 times[n * bytes_per_block][0]) for n, _ in sizes]


def _bench_copy_kernels(num_blocks: int, n: int, repeats: int, device: str) -> list[dict]:
    """Gather and scatter of n shuffled blocks of the stacked cache with each copy kernel."""
    from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer
    from pdserve.kernels import triton_available

    cache = _caches(num_blocks, device, seed=4)
    layout = KVLayout.from_caches(cache)
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5))[:n].tolist()
    layers = range(layout.num_layers)
    rows = []
    for kernel in ("torch", "triton") if triton_available() else ("torch",):
        copier = BlockCopier(list(cache.unbind(0)), layout, PullPhases(), kernel=kernel)
        staging = StagingBuffer(cache.device, host_mirror=False)
        for name, op in (("gather", copier.gather), ("scatter", copier.scatter)):
            times = []
            for _ in range(repeats + 1):
                before = copier.phases.copy_gpu_s
                op(ids, staging, layers)
                times.append(copier.phases.copy_gpu_s - before)
            rows.append(_row(f"{name}-{kernel}", n, copier.nbytes(n), times[1:], times[0]))
    return rows


def _add_ceiling_share(rows: list[dict]) -> None:
    """row["pct_of_ceiling"]: GB/s as % of the same size's p2p-copy, cuda-ipc-copy or raw-socket."""
    for ceiling in ("p2p-copy", "cuda-ipc-copy", "raw-socket"):
        best = {row["num_blocks"]: row["gb_per_s"] for row in rows if row["backend"] == ceiling}
        if best:
            break
    for row in rows:
        if "phases" in row and row["num_blocks"] in best:
            row["ceiling"] = ceiling
            row["pct_of_ceiling"] = 100 * row["gb_per_s"] / best[row["num_blocks"]]


def _row(name: str, num_blocks: int, nbytes: int, times: list[float], cold_s: float) -> dict:
    median_s = statistics.median(times)
    return dict(backend=name, num_blocks=num_blocks, mib=nbytes / 2**20,
                latency_ms=median_s * 1e3, min_ms=min(times) * 1e3, cold_ms=cold_s * 1e3,
                gb_per_s=nbytes / median_s / 1e9, repeats=len(times))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size-mb", type=int, default=256, help="the large handoff")
    parser.add_argument("--backends", default="tcp,ucx")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-gpu", default=None, help="GPU of the prefill side (with --client-gpu)")
    parser.add_argument("--client-gpu", default=None, help="GPU of the decode side, this process")
    parser.add_argument("--unmasked", action="store_true",
                        help="with --server-gpu/--client-gpu: both processes see every GPU and use "
                             "cuda:SERVER / cuda:CLIENT (instead of one visible GPU each)")
    parser.add_argument("--ipc-lease-check", action="store_true",
                        help="ipc: the server announces no lease expiry, so every pull adds the "
                             "PullDone round trip (default: leases hold 30 s, as a worker's)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if (args.server_gpu is None) != (args.client_gpu is None) or (args.server_gpu and args.device != "cuda"):
        parser.error("--server-gpu and --client-gpu go together, with --device cuda")
    server_device = client_device = args.device
    server_visible = None
    if args.client_gpu is not None and args.unmasked:
        server_device, client_device = f"cuda:{args.server_gpu}", f"cuda:{args.client_gpu}"
        torch.cuda.set_device(client_device)
    elif args.client_gpu is not None:  # before this process's first CUDA call
        os.environ["CUDA_VISIBLE_DEVICES"] = args.client_gpu
        server_visible = args.server_gpu
    backends = [b for b in args.backends.split(",") if b]
    if "local" in backends:
        parser.error("local is a same-process backend: this benchmark spans two processes")

    layout = KVLayout(num_blocks=1, dtype="bfloat16", **LLAMA3_8B)
    block_counts = sorted({max(1, math.ceil(mb * 2**20 / layout.bytes_per_block))
                           for mb in (*SMALL_SIZES_MB, args.size_mb)})
    num_blocks = 2 * block_counts[-1]  # room for a shuffled lease
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    leases = {f"handoff-{n}": order[:n] for n in block_counts}
    sizes = [(n, f"handoff-{n}") for n in block_counts]
    max_bytes = block_counts[-1] * layout.bytes_per_block

    context = multiprocessing.get_context("spawn")
    info, commands = context.Queue(), context.Queue()
    prefill = context.Process(target=_prefill_side, daemon=True, args=(
        server_device, num_blocks, backends, leases, max_bytes, info, commands, server_visible,
        args.ipc_lease_check))
    prefill.start()

    def server_phases(backend: str) -> PullPhases:
        commands.put(("phases", backend))
        return PullPhases(**info.get(timeout=60))

    rows = []
    try:
        ready = info.get(timeout=120)
        for backend in backends:
            rows += asyncio.run(_bench_backend(backend, ready["addresses"][backend], sizes,
                                               num_blocks, client_device, args.repeats,
                                               server_phases))
        rows += _bench_raw_socket(ready["raw_port"], sizes, layout.bytes_per_block, args.repeats)
        if args.server_gpu is not None:
            rows += _bench_p2p_copy(args.server_gpu, args.client_gpu, sizes, layout.bytes_per_block,
                                    args.repeats)
        elif args.device == "cuda":
            rows += _bench_cuda_ipc(ready["cuda_buffer"], sizes, layout.bytes_per_block,
                                    args.repeats)
        del ready  # release the shared CUDA buffer before the owner exits
        if args.device == "cuda":
            rows += _bench_copy_kernels(num_blocks, block_counts[-1], args.repeats, client_device)
    finally:
        commands.put("stop")
        prefill.join(timeout=30)
        if prefill.is_alive():
            prefill.kill()

    print(f"KV handoff, Llama-3-8B layout ({layout.bytes_per_block / 2**20:.0f} MiB a block), "
          f"device={args.device}, median of {args.repeats} pulls after one cold pull")
    _add_ceiling_share(rows)
    print(f"{'backend':<14} {'blocks':>6} {'MiB':>7} {'GB/s':>7} {'median ms':>10} "
          f"{'min ms':>8} {'cold ms':>8} {'% ceil':>7}")
    for row in rows:
        share = row.get("pct_of_ceiling")
        print(f"{row['backend']:<14} {row['num_blocks']:>6} {row['mib']:>7.0f} "
              f"{row['gb_per_s']:>7.2f} {row['latency_ms']:>10.2f} {row['min_ms']:>8.2f} "
              f"{row['cold_ms']:>8.1f} {'' if share is None else f'{share:.0f}':>7}")
    print("\nphases, ms per pull (mean of the timed pulls; gpu = CUDA event time)")
    print(f"{'backend':<14} {'blocks':>6} {'total':>7} {'request':>8} {'gather':>7} "
          f"{'[gpu]':>6} {'send':>7} {'recv':>7} {'scatter':>8} {'[gpu]':>6} {'other':>7} "
          f"{'msgs':>5}")
    for row in rows:
        if "phases" not in row:
            continue
        p = row["phases"]
        print(f"{row['backend']:<14} {row['num_blocks']:>6} {p['total_ms']:>7.2f} "
              f"{p['request_ms']:>8.2f} {p['gather_ms']:>7.2f} {p['gather_gpu_ms']:>6.2f} "
              f"{p['send_ms']:>7.2f} {p['recv_ms']:>7.2f} {p['scatter_ms']:>8.2f} "
              f"{p['scatter_gpu_ms']:>6.2f} {p['other_ms']:>7.2f} {p['messages']:>5.0f}")
    result = dict(bench="kv_transfer", device=args.device, layout=layout.to_dict(),
                  server_gpu=args.server_gpu, client_gpu=args.client_gpu, unmasked=args.unmasked,
                  ipc_lease_check=args.ipc_lease_check,
                  torch=torch.__version__, results=rows)
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
