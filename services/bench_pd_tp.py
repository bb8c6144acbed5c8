"""bench_pd_gpu's tp part: prefill TP=p -> decode TP=d stacks, greedy tokens vs `pdserve generate`.

    reference   `pdserve generate` at TP=1 on GPU 0 (CPU: cpu) of the seeded-weights model
    per layout  place_layout -> `pdserve up` (1 prefill, 1 decode, router) -> ready -> each
                greedy prompt through the router, one at a time -> stack stopped -> JSON saved

Placement (place_layout) on G GPUs (--cpu-gpus on CPU, where every rank runs on the cpu but the
layouts, transports and pool sizes follow the same plan, so a CPU run covers the GPU run's logic):

    p + d <= G          prefill ranks on GPUs 0..p-1, decode on p..p+d-1; KV over nccl
    --tp-share-gpus     decode's ranks on the last d GPUs, beside prefill's; KV over ucx
      and max(p, d) <= G  (NCCL takes no two ranks of a pair on one GPU; ucx uses cuda_ipc, which
                         also maps memory of the same GPU in another process)
    otherwise           skipped, with the reason

Each worker gets `--device cuda:FIRST --tensor-parallel-size N`: its rank r runs on cuda:FIRST+r
(tp_workers.rank_device), every process sees every GPU, and each TP group (NCCL on GPU, gloo on
CPU) meets at its own rank 0's TCPStore on a free port, so the two groups of a layout never share
a rendezvous. Pools have a fixed size (--num-gpu-blocks-override): no memory profile on a GPU
that another stack's process is filling at the same moment.

Nothing waits without a deadline: the reference (--tp-ready-timeout), each stack's start (the
same, and what --tp-budget-s leaves), each request (--tp-request-timeout). A stack that does
not come up is named with its layout and the processes that had not announced themselves; the
Python stacks of its processes (SIGUSR1) land in its output, which is echoed with a [tp-P-D]
prefix. Progress lines ("tp 2:1: ready in 21.3 s", "prompt 3/4 equal") are flushed as they come
and bench_pd_gpu.json is rewritten after every layout, so a run cut short shows how far it got.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from pdserve.services.bench_gpu import TINY
from pdserve.services.bench_pd_model import greedy_summary, ids_of, write_model, write_weights
from pdserve.services.bench_stack import Stack, StackNotReady
from pdserve.services.local_stack import free_port

MIN_LAYOUT_S = 20.0  # a layout is not started with less of --tp-budget-s left
MIN_WAIT_S = 5.0  # the shortest wait the budget cuts one to


@dataclass(frozen=True)
class Placement:
    """Where one prefill:decode layout's ranks run and how its KV moves."""

    layout: str  # "p:d"
    prefill_tp: int
    decode_tp: int
    prefill_gpus: tuple[int, ...] = ()  # the GPU of each rank, in rank order (empty: skipped)
    decode_gpus: tuple[int, ...] = ()
    kv_transport: str = "nccl"
    skipped: str | None = None  # why it does not run

    @property
    def shared(self) -> bool:
        return bool(set(self.prefill_gpus) & set(self.decode_gpus))

    def device(self, role: str, gpu: bool) -> str:
        """The worker's --device: its rank 0's GPU (rank r runs on the next ones), or cpu."""
        gpus = self.prefill_gpus if role == "prefill" else self.decode_gpus
        return f"cuda:{gpus[0]}" if gpu else "cpu"

    def describe(self) -> str:
        return (f"prefill TP={self.prefill_tp} on GPUs {list(self.prefill_gpus)}, decode TP={self.decode_tp} on "
                f"GPUs {list(self.decode_gpus)}{' (shared)' if self.shared else ''}, KV over {self.kv_transport}")


def place_layout(layout: str, num_gpus: int, share: bool) -> Placement:
    """The placement of `layout` ("p:d") on num_gpus GPUs (module docstring)."""
    try:
        p, d = (int(x) for x in layout.split(":"))
    except ValueError:
        raise ValueError(f"--tp-layouts: {layout!r} is not PREFILL_TP:DECODE_TP (e.g. 2:1)") from None
    if p < 1 or d < 1:
        raise ValueError(f"--tp-layouts: {layout!r} needs sizes >= 1")
    if p + d <= num_gpus:
        return Placement(layout, p, d, tuple(range(p)), tuple(range(p, p + d)), "nccl")
    if share and max(p, d) <= num_gpus:
        return Placement(layout, p, d, tuple(range(p)), tuple(range(num_gpus - d, num_gpus)), "ucx")
    need = f"{max(p, d)} GPUs even beside each other" if share else \
        f"{p + d} GPUs (one per rank; --tp-share-gpus puts decode beside prefill)"
    return Placement(layout, p, d, skipped=f"needs {need}, {num_gpus} visible")


def log(message: str) -> None:
    print(message, flush=True)


def within(timeout_s: float, budget_end: float | None) -> float:
    """timeout_s, cut to what is left of the budget (at least MIN_WAIT_S: a wait gets a chance)."""
    if budget_end is None:
        return timeout_s
    return max(MIN_WAIT_S, min(timeout_s, budget_end - time.monotonic()))


def run_tp(bench) -> dict:
    """The tp part (module docstring) for bench_pd_gpu's Bench; returns its report, which is also
    bench.report["tp"] and saved (bench.save()) after every layout."""
    a = bench.args
    start = time.monotonic()
    budget_end = None if a.tp_budget_s is None else start + a.tp_budget_s
    num_gpus = visible_gpus() if bench.gpu else a.cpu_gpus
    placements = [place_layout(x, num_gpus, a.tp_share_gpus) for x in a.tp_layouts.split(",") if x]
    out = bench.report["tp"] = {"gpus": num_gpus, "layouts": {}}
    # real (seeded random) weights: `--load-format dummy` draws each rank's shard anew, so a
    # TP=2 prefill and a TP=1 decode would run different models
    folder = write_weights(write_model(tempfile.mkdtemp(prefix="pdserve-pd-tp-"), tiny=True),
                           "bfloat16" if bench.gpu else "float32", a.seed)
    sizing = bench.sizing_args  # one pool size everywhere (module docstring); CPU runs have it already
    if "--num-gpu-blocks-override" not in sizing:
        sizing = [*sizing, "--num-gpu-blocks-override", "2048"]
    log(f"tp: reference: `pdserve generate` at TP=1, {a.greedy_prompts} prompts x {a.greedy_tokens} tokens")
    t0 = time.monotonic()
    timeout = within(a.tp_ready_timeout, budget_end)
    try:
        prompts, reference = bench.greedy_reference(folder, TINY["vocab_size"], sizing, timeout_s=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the reference `pdserve generate` (TP=1) did not finish within {timeout:.0f} s") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"the reference `pdserve generate` (TP=1) failed with status {e.returncode} "
                           "(its output is above)") from None
    log(f"tp: reference done in {time.monotonic() - t0:.1f} s")
    for placement in placements:
        name = placement.layout
        if placement.skipped:
            out["layouts"][name] = {"skipped": placement.skipped}
            log(f"tp {name}: skipped: {placement.skipped}")
            continue
        if budget_end is not None and budget_end - time.monotonic() < MIN_LAYOUT_S:
            out["layouts"][name] = {"skipped": f"not run: --tp-budget-s {a.tp_budget_s:.0f} spent"}
            log(f"tp {name}: {out['layouts'][name]['skipped']}")
            continue
        t0 = time.monotonic()
        try:
            result = run_layout(bench, placement, folder, sizing, prompts, reference, budget_end)
        except Exception as e:  # one layout's failure must not lose the next ones
            result = {"error": f"{type(e).__name__}: {e}"}
            log(f"tp {name}: FAILED after {time.monotonic() - t0:.1f} s: {e}")
        except SystemExit:  # SIGTERM (a time limit): say which layout it cut, then unwind
            out["layouts"][name] = {"error": f"interrupted after {time.monotonic() - t0:.1f} s"}
            log(f"tp {name}: {out['layouts'][name]['error']}")
            bench.save()
            raise
        out["layouts"][name] = {**result, "seconds": round(time.monotonic() - t0, 1), "kv_transport":
                                placement.kv_transport, "shared_gpus": placement.shared,
                                "prefill_gpus": list(placement.prefill_gpus), "decode_gpus": list(placement.decode_gpus)}
        bench.save()
    return out


def run_layout(bench, placement: Placement, folder: str, sizing: list[str], prompts: list[str],
               reference: list[list[int]], budget_end: float | None) -> dict:
    """One layout's stack, its greedy prompts and its summary (raises StackNotReady & co.);
    budget_end: the monotonic time by which it must be done (None: only the timeouts bound it)."""
    a, name = bench.args, placement.layout
    log(f"tp {name}: starting: {placement.describe()}")
    port = free_port()
    argv = ["up", "--prefill", "1", "--decode", "1", "--port", str(port), "--model", folder,
            "--kv-transport", placement.kv_transport, "--worker-args", " ".join(sizing),
            "--router-args", "--disagg-min-prompt-tokens 0 --served-model-name bench",
            "--prefill-args", f"--device {placement.device('prefill', bench.gpu)} "
                              f"--tensor-parallel-size {placement.prefill_tp}",
            "--decode-args", f"--device {placement.device('decode', bench.gpu)} "
                             f"--tensor-parallel-size {placement.decode_tp}"]
    tag = f"tp-{name.replace(':', '-')}"
    stack = Stack(tag, argv, f"http://127.0.0.1:{port}", 2, bench.work_dir, echo=True,
                  expected=["redis", "prefill-0", "decode-0", "router"])
    try:
        try:
            ready_s = stack.wait_ready(within(a.tp_ready_timeout, budget_end))
        except StackNotReady as e:
            raise StackNotReady(f"layout {name} ({placement.describe()}): {e}") from None
        log(f"tp {name}: ready in {ready_s:.1f} s")
        got, stats = greedy_prompts(bench, stack, name, prompts, reference, budget_end)
    finally:
        stack.stop()
    summary = greedy_summary(reference, got, stats)
    log(f"tp {name}: {summary['equal']}/{summary['prompts']} equal to generate, handoffs {summary['handoffs']}, "
        f"prompt tokens recomputed {summary['recomputed_prompt_tokens']}")
    return {**summary, "ready_s": round(ready_s, 1)}


def greedy_prompts(bench, stack: Stack, name: str, prompts: list[str], reference: list[list[int]],
                   budget_end: float | None) -> tuple[list[list[int]], dict]:
    """Each prompt's greedy token ids through the router, one at a time (as generate ran them),
    with a progress line each; and the router's stats."""
    import httpx
    a = bench.args
    got = []
    stats: dict = {}
    for i, (prompt, ref) in enumerate(zip(prompts, reference), start=1):
        t0 = time.monotonic()
        timeout = within(a.tp_request_timeout, budget_end)
        body = {"model": "bench", "prompt": prompt, "max_tokens": a.greedy_tokens, "temperature": 0,
                "ignore_eos": True}
        try:
            reply = httpx.post(stack.url + "/v1/completions", json=body, timeout=timeout)
        except httpx.TimeoutException:
            stack.dump_stacks()  # where each process waits, into the stack's output
            raise TimeoutError(f"layout {name}: prompt {i}/{len(prompts)} got no answer within "
                               f"{timeout:.0f} s") from None
        if reply.status_code != 200:
            raise RuntimeError(f"layout {name}: prompt {i}/{len(prompts)}: HTTP {reply.status_code}: "
                               f"{reply.text[:500]}")
        ids = ids_of(reply.json()["choices"][0]["text"])
        got.append(ids)
        before, stats = stats, httpx.get(stack.url + "/admin/stats", timeout=10).json()
        handoff = (stats.get("handoffs") or 0) - (before.get("handoffs") or 0)
        recomputed = (stats.get("recomputed_prompt_tokens") or 0) - (before.get("recomputed_prompt_tokens") or 0)
        agree = next((k for k, (x, y) in enumerate(zip(ids, ref)) if x != y), min(len(ids), len(ref)))
        verdict = "equal" if ids == ref else f"differs from token {agree} of {len(ref)}"
        log(f"tp {name}: prompt {i}/{len(prompts)} {verdict} ({time.monotonic() - t0:.1f} s, "
            f"handoff {'yes' if handoff else 'no'}, recomputed {recomputed})")
    return got, stats


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi), without touching CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


def print_tp_report(tp: dict) -> None:
    print(f"\nprefill TP -> decode TP on {tp['gpus']} GPUs: greedy == generate at TP=1, handoffs, "
          "prompt tokens decode recomputed")
    for layout, r in tp["layouts"].items():
        if "skipped" in r:
            line = r["skipped"]
        elif "error" in r:
            line = f"FAILED: {r['error'].splitlines()[0][:300]}"
        else:
            line = (f"{r['equal']}/{r['prompts']} equal, handoffs {r['handoffs']}, recomputed "
                    f"{r['recomputed_prompt_tokens']}, ready in {r['ready_s']} s, {r['seconds']} s in all")
        if "kv_transport" in r:
            line += (f"; kv {r['kv_transport']}, GPUs prefill {r['prefill_gpus']} decode {r['decode_gpus']}"
                     + (" (shared)" if r["shared_gpus"] else ""))
        print(f"  {layout:<5} {line}")
    sys.stdout.flush()
