"""`pdserve bench graphs`: GPU time of one decode step per CUDA-graph bucket (batch size).

On a small model a decode step is hundreds of small kernels and the GPU, not the host, sets its
time (SmolLM2 on an H200: 300 kernels, 0.72 ms of GPU time in a 0.75 ms step), so how the step's
GPU time grows with its rows decides what a batch, or a speculative verify step of k + 1 rows,
costs against a one-row step. Each bucket's captured graph is replayed alone (its static inputs
set to --context tokens of context in every row, padding slots: nothing is written to the KV
cache), timed with CUDA events, for the linears' routing as chosen at start-up (gemv for one row,
gemv_rows for 2-16 where they beat cuBLAS: models/triton_attention.choose_gemv) and with every
2+-row product on cuBLAS (the graphs re-captured). CUDA only.

    pdserve bench graphs [--model M] [--context 600] [--max-rows 32] [--speculative-config ...]
"""

from __future__ import annotations

import json


def add_parser(bench_sub, add_engine_args) -> None:
    p = bench_sub.add_parser("graphs", help="GPU ms of a decode step per CUDA-graph batch size (gemv_rows vs cuBLAS)")
    p.add_argument("--context", type=int, default=600, help="context tokens of every row (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=32, help="largest bucket timed (default: %(default)s)")
    p.add_argument("--replays", type=int, default=200, help="timed replays per bucket (default: %(default)s)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    add_engine_args(p)
    p.set_defaults(func=cmd_graphs)


def replay_ms(graphs, rows: int, context: int, replays: int) -> float:
    """GPU ms of one replay of the `rows` bucket with `context` tokens of context per row."""
    import torch
    st = graphs._static
    blocks = -(-context // graphs.block_size)
    if blocks > st["table"].shape[1]:
        raise SystemExit(f"bench graphs: --context {context} needs {blocks} blocks a row; --max-model-len allows "
                         f"{st['table'].shape[1]}")
    st["ctx"].zero_()
    st["table"].zero_()
    st["ctx"][:rows] = context
    st["table"][:rows, :blocks] = torch.arange(blocks, device=st["table"].device, dtype=st["table"].dtype)
    graph = graphs._graphs[rows]
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    st["ctx"].zero_()
    st["table"].zero_()
    return start.elapsed_time(end) / replays


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
        for name, routing in (("as chosen", chosen), ("cuBLAS for 2+ rows", {})):
            TRITON_OPS.gemv_rows.clear()
            TRITON_OPS.gemv_rows.update(routing)
            graphs.capture(runner.greedy_tail)
            table[name] = {b: round(replay_ms(graphs, b, args.context, args.replays), 4) for b in sizes}
    finally:
        TRITON_OPS.gemv_rows.clear()
        TRITON_OPS.gemv_rows.update(chosen)
    print(f"GPU ms per decode-graph replay, {args.context} tokens of context per row "
          f"({llm.engine.model_name}, {str(runner.dtype).removeprefix('torch.')}):")
    print(f"{'rows':>20} | " + " ".join(f"{b:>7}" for b in sizes))
    for name, row in table.items():
        print(f"{name:>20} | " + " ".join(f"{row[b]:7.4f}" for b in sizes))
    print("linears' routing (us: cuBLAS, kernel):", json.dumps(runner.gemv_choice))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"context": args.context, "replay_ms": table, "gemv_choice": runner.gemv_choice}, f, indent=2)
    llm.shutdown()
