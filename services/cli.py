"""The `pdserve` command: generate, chat, serve, bench (and the disaggregated services).

Every user error ends in one line on stderr and exit status 2; nothing prints a traceback for
a bad flag, a missing model or an invalid sampling parameter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pdserve.common.config import ConfigError, HelpFormatter, add_engine_args, check_output_path, engine_config


class Parser(argparse.ArgumentParser):
    """Every `pdserve` parser and subparser (add_subparsers makes them of this class): help
    shows each flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("pdserve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags of generate/chat. Their seed is the engine's `--seed` (vLLM's flag): given,
    it also seeds every prompt, so a run is reproducible; not given, sampling is unseeded."""
    g = p.add_argument_group("sampling (every prompt; --seed also seeds each one)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set of tokens of this mass")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (-1: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top one's probability")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end a completion")


def sampling_params(args: argparse.Namespace):
    """`args.seed` is the engine option `--seed`: None (not given) leaves sampling unseeded."""
    from pdserve.common.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n,
                          ignore_eos=args.ignore_eos, stop=args.stop, stop_token_ids=args.stop_token_ids)


def cmd_generate(args) -> None:
    """One prompt per line -> JSONL. `--chat`: each line is one user message through the model's
    chat template; without it lines go to the model as raw text (warned once on a chat model)."""
    from pdserve.common.engine.llm import LLM
    params = sampling_params(args)
    check_output_path(args.output, "--output")
    with open(args.input) as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"{args.input} holds no prompts (one per line)")
    llm = LLM.from_config(engine_config(args))
    try:  # shut down before the interpreter exits: tensor-parallel ranks' threads and groups end in order
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
        else:
            if llm.get_tokenizer().chat_template:
                print(f"pdserve generate: {llm.engine.model_name} is a chat model; prompts are sent as raw text "
                      "(--chat applies its chat template to each line)", file=sys.stderr)
            outs = llm.generate(prompts, params, use_tqdm=True)
    finally:
        llm.shutdown()
    sink = open(args.output, "w") if args.output != "-" else sys.stdout
    with sink if sink is not sys.stdout else _nullctx():
        for prompt, out in zip(prompts, outs):
            for c in out.outputs:
                sink.write(json.dumps({"prompt": prompt, "index": c.index, "generated": c.text,
                                       "tokens": len(c.token_ids), "prompt_tokens": len(out.prompt_token_ids),
                                       "finish_reason": c.finish_reason, "token_ids": c.token_ids}) + "\n")


def cmd_chat(args) -> None:
    from pdserve.common.engine.llm import LLM
    # one conversation, one request at a time: the KV pages faulted in after start (CPU) are one request's
    llm = LLM.from_config(engine_config(args, max_num_seqs=1))
    try:
        _chat_loop(llm, args)
    finally:
        llm.shutdown()


def _chat_loop(llm, args) -> None:
    """One answer, or a conversation from stdin (blank lines skipped). With --n > 1 every answer
    is printed, numbered; the conversation goes on from the first."""
    params = sampling_params(args)

    def answer(history: list[dict]) -> str:
        outputs = llm.chat(history, params, use_tqdm=False)[0].outputs
        for c in outputs:
            print(c.text if len(outputs) == 1 else f"[{c.index}] {c.text}", flush=True)
        return outputs[0].text
    if args.message:
        answer([{"role": "user", "content": args.message}])
        return
    history: list[dict] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": answer(history)})


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pdserve", description="Disaggregated prefill/decode LLM server")
    parser.add_argument("--version", action="version", version=f"pdserve {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="offline batch generation: one prompt per line -> JSONL")
    p.add_argument("--input", required=True, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--output", default="-", help="JSONL file of results (-: stdout)")
    p.add_argument("--chat", action="store_true",
                   help="apply the model's chat template to each line (one user message); default: raw text")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (one message, or lines from stdin)")
    p.add_argument("message", nargs="?", help="one message to answer (default: a conversation on stdin, one "
                                               "message per line)")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat, temperature=0.0)

    from pdserve.services import bench, bench_gpu, bench_graphs, bench_spec, bench_structured, disagg_cli, serve
    bench_sub = bench.add_parser(sub, add_engine_args)
    bench_gpu.add_parser(bench_sub)  # `pdserve bench gpu` (H100 workloads)
    bench_structured.add_parser(bench_sub)  # `pdserve bench structured` (grammar vs none)
    bench_spec.add_parser(bench_sub, add_engine_args)  # `pdserve bench spec` (speculative decoding)
    bench_graphs.add_parser(bench_sub, add_engine_args)  # `pdserve bench graphs` (decode-graph GPU ms per batch)
    serve.add_parser(sub, add_engine_args)
    from pdserve.services import quantize; quantize.add_parser(sub)
    disagg_cli.add_parsers(sub, add_engine_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.services.entry import run_parsed
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run_parsed(f"pdserve {args.command}", args.func, args)


def console_main() -> None:
    """The `pdserve` command (pyproject's script): main, then the process ends (entry.exit_process)."""
    from pdserve.services.entry import exit_process
    exit_process(main())


if __name__ == "__main__":
    console_main()
