"""The `pdserve` command: generate, chat, serve, bench (and the disaggregated services).

Every user error ends in one line on stderr and exit status 2; nothing prints a traceback for
a bad flag, a missing model or an invalid sampling parameter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pdserve.common.config import ConfigError, add_engine_args, engine_config
from pdserve.common.sampling_params import ParameterError


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed of every request (reproducible outputs)")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[])


def sampling_params(args: argparse.Namespace):
    from pdserve.common.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n,
                          ignore_eos=args.ignore_eos, stop=args.stop, stop_token_ids=args.stop_token_ids)


def cmd_generate(args) -> None:
    from pdserve.common.engine.llm import LLM
    params = sampling_params(args)
    with open(args.input) as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"{args.input} holds no prompts (one per line)")
    llm = LLM.from_config(engine_config(args))
    outs = llm.generate(prompts, params, use_tqdm=True)
    sink = open(args.output, "w") if args.output != "-" else sys.stdout
    with sink if sink is not sys.stdout else _nullctx():
        for out in outs:
            for c in out.outputs:
                sink.write(json.dumps({"prompt": out.prompt, "index": c.index, "generated": c.text,
                                       "tokens": len(c.token_ids), "prompt_tokens": len(out.prompt_token_ids),
                                       "finish_reason": c.finish_reason, "token_ids": c.token_ids}) + "\n")


def cmd_chat(args) -> None:
    from pdserve.common.engine.llm import LLM
    llm = LLM.from_config(engine_config(args))
    params = sampling_params(args)
    if args.message:
        print(llm.chat([{"role": "user", "content": args.message}], params, use_tqdm=False)[0].outputs[0].text)
        return
    history: list[dict] = []
    for line in sys.stdin:
        history.append({"role": "user", "content": line.strip()})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="offline batch generation: one prompt per line -> JSONL")
    p.add_argument("--input", required=True)
    p.add_argument("--output", default="-")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (one message, or lines from stdin)")
    p.add_argument("message", nargs="?")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat, temperature=0.0)

    from pdserve.services import bench, bench_gpu, bench_spec, disagg_cli, serve
    bench_sub = bench.add_parser(sub, add_engine_args)
    bench_gpu.add_parser(bench_sub)  # `pdserve bench gpu` (H100 workloads)
    bench_spec.add_parser(bench_sub, add_engine_args)  # `pdserve bench spec` (speculative decoding)
    serve.add_parser(sub, add_engine_args)
    disagg_cli.add_parsers(sub, add_engine_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ParameterError, FileNotFoundError, IsADirectoryError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
