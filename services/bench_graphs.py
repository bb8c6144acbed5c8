"""`pdserve bench graphs`: GPU time of one decode step per CUDA-graph bucket (batch size).

On a small model a decode step is hundreds of small kernels and the GPU, not the host, sets its
time (SmolLM2 on an H200: 300 kernels, 0.72 ms of GPU time in a 0.75 ms step), so how the step's
GPU time grows with its rows decides what a batch, or a speculative verify step of k + 1 rows,
costs against a one-row step. Each bucket's captured graph is replayed alone (its static inputs
set to --context tokens of context in every row, padding slots: nothing is written to the KV
cache), timed with CUDA events, for the linears' routing as chosen at start-up (gemv for one row,
gemv_rows for 2-16 where they beat cuBLAS: models/triton_attention.choose_gemv) and with every
2+-row product on cuBLAS (the graphs re-captured), and with --splits S: the decode attention in S
splits in every bucket (re-captured). CUDA only.

    pdserve bench graphs [--model M] [--context 600] [--max-rows 32] [--splits 1 4] [--speculative-config ...]
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import tempfile


def add_parser(bench_sub, add_engine_args) -> None:
    p = bench_sub.add_parser("graphs", help="GPU ms of a decode step per CUDA-graph batch size (gemv_rows vs cuBLAS)")
    p.add_argument("--context", type=int, default=600, help="context tokens of every row (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=32, help="largest bucket timed (default: %(default)s)")
    p.add_argument("--replays", type=int, default=200, help="timed replays per bucket (default: %(default)s)")
    p.add_argument("--profile", type=int, nargs="*", default=None, metavar="ROWS",
                   help="also list each given bucket's kernels (torch.profiler over 10 replays, routing as chosen; "
                        "with programmatic dependent launch a kernel's time includes its wait for the one before)")
    p.add_argument("--splits", type=int, nargs="*", default=None, metavar="S",
                   help="also time every bucket with its decode attention in S splits (the graphs re-captured; "
                        "the engine's choice per bucket: kernels/decode_attention.choose_num_splits)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    add_engine_args(p)
    p.set_defaults(func=cmd_graphs)


@contextlib.contextmanager
def inputs(graphs, rows: int, context: int, grouped: bool = False):
    """The graphs' static inputs set to `context` tokens of context in each of the first `rows`
    rows (slots stay padding: nothing is written to the KV cache), reset to padding after.
    grouped: the bucket's grouped graph, its rows as verify steps' groups of graphs.group_rows
    rows, contexts context, context + 1, .. within a group -> the graph to replay."""
    import torch
    st = graphs._static
    blocks = -(-(context + graphs.group_rows) // graphs.block_size)
    if blocks > st["table"].shape[1]:
        raise SystemExit(f"bench graphs: --context {context} needs {blocks} blocks a row; --max-model-len allows "
                         f"{st['table'].shape[1]}")
    st["table"][:rows, :blocks] = torch.arange(blocks, device=st["table"].device, dtype=st["table"].dtype)
    st["ctx"][:rows] = context
    if grouped:
        offset = torch.arange(rows, device=st["ctx"].device, dtype=st["ctx"].dtype) % graphs.group_rows
        st["ctx"][:rows] += offset
        st["groups"][:rows] = torch.where(offset == 0, torch.clamp(rows - torch.arange(rows, device=offset.device),
                                                                   max=graphs.group_rows), 0).to(st["groups"].dtype)
    try:
        yield graphs._graphs[(rows, grouped)]
    finally:
        st["ctx"].zero_()
        st["table"].zero_()
        st["groups"].fill_(1)


def replay_ms(graphs, rows: int, context: int, replays: int, grouped: bool = False) -> float:
    """GPU ms of one replay of the `rows` bucket with `context` tokens of context per row."""
    from pdserve.kernels.timing import event_ms
    with inputs(graphs, rows, context, grouped) as graph:
        for _ in range(10):
            graph.replay()
        return event_ms(graph.replay, replays)


def kernel_table(graphs, rows: int, context: int, grouped: bool = False,
                 replays: int = 10) -> list[tuple[str, float, float]]:
    """(kernel name, calls per replay, us per replay) of the `rows` bucket, most time first."""
    import torch
    with inputs(graphs, rows, context, grouped) as graph:
        for _ in range(10):
            graph.replay()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    finally:
        os.remove(path)
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        entry = agg[e["name"][:80]]
        entry[0] += 1
        entry[1] += e["dur"]
    return sorted(((name, n / replays, us / replays) for name, (n, us) in agg.items()), key=lambda r: -r[2])


def cmd_graphs(args) -> None:
    from pdserve.common.config import engine_config
    from pdserve.common.engine.llm import LLM
    from pdserve.common.models.triton_attention import TRITON_OPS
    llm = LLM.from_config(engine_config(args))
    runner = llm.engine.runner
    graphs = runner.graphs
    if graphs is None:
        raise SystemExit("bench graphs: the engine has no CUDA graphs (CUDA only, without --enforce-eager)")
    sizes = [b for b in graphs.sizes if b <= args.max_rows]
    chosen = dict(TRITON_OPS.gemv_rows)
    table = {}
    try:
        for name, routing in (("cuBLAS for 2+ rows", {}), ("as chosen", chosen)):  # (the engine's last)
            TRITON_OPS.gemv_rows.clear()
            TRITON_OPS.gemv_rows.update(routing)
            graphs.capture(runner.greedy_tail)
            table[name] = {b: round(replay_ms(graphs, b, args.context, args.replays), 4) for b in sizes}
    finally:
        TRITON_OPS.gemv_rows.clear()
        TRITON_OPS.gemv_rows.update(chosen)
    table = {"as chosen": table["as chosen"], "cuBLAS for 2+ rows": table["cuBLAS for 2+ rows"]}
    if args.splits:  # the same graphs with a fixed split count, then the engine's choice back
        chosen_splits, chosen_group_splits = dict(graphs.num_splits), dict(graphs.group_splits)
        try:
            for num in args.splits:
                graphs.num_splits = {b: num for b in graphs.sizes}
                graphs.group_splits = {b: num for b in chosen_group_splits}
                graphs.capture(runner.greedy_tail)
                table[f"{num} splits"] = {b: round(replay_ms(graphs, b, args.context, args.replays), 4) for b in sizes}
                if chosen_group_splits:
                    table[f"groups, {num} splits"] = {
                        b: round(replay_ms(graphs, b, args.context, args.replays, grouped=True), 4)
                        for b in sizes if b in chosen_group_splits}
        finally:
            graphs.num_splits, graphs.group_splits = chosen_splits, chosen_group_splits
            graphs.capture(runner.greedy_tail)
        print("splits as chosen per bucket:", {b: chosen_splits[b] for b in sizes},
              "grouped:", {b: chosen_group_splits[b] for b in sizes if b in chosen_group_splits})
    if graphs.group_splits:  # a speculative engine: its verify rows as groups
        table[f"verify groups of {graphs.group_rows}"] = {
            b: round(replay_ms(graphs, b, args.context, args.replays, grouped=True), 4)
            for b in sizes if b in graphs.group_splits}
    print(f"GPU ms per decode-graph replay, {args.context} tokens of context per row "
          f"({llm.engine.model_name}, {str(runner.dtype).removeprefix('torch.')}):")
    print(f"{'rows':>20} | " + " ".join(f"{b:>7}" for b in sizes))
    for name, row in table.items():
        print(f"{name:>20} | " + " ".join(f"{row[b]:7.4f}" if b in row else "      -" for b in sizes))
    print("linears' routing (us: cuBLAS, kernel):", json.dumps(runner.gemv_choice))
    kernels = {}
    for rows in args.profile or []:
        if rows not in graphs.sizes:
            raise SystemExit(f"bench graphs: --profile {rows}: no graph of {rows} rows (sizes: {graphs.sizes})")
        grouped = rows in graphs.group_splits
        kernels[rows] = kernel_table(graphs, rows, args.context, grouped)
        print(f"kernels of the {rows}-row {'grouped ' if grouped else ''}graph (calls and us per replay; "
              "PDL waits included):")
        for name, calls, us in kernels[rows][:12]:
            print(f"  {calls:5.0f} x {us / calls:6.2f} us = {us:7.1f} us  {name}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"context": args.context, "replay_ms": table, "gemv_choice": runner.gemv_choice,
                       "kernels": kernels}, f, indent=2)
    llm.shutdown()
