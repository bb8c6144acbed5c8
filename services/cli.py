"""The `pdserve` command: generate, chat, serve, bench (and the disaggregated services).

Every user error ends in one line on stderr and exit status 2; nothing prints a traceback for
a bad flag, a missing model or an invalid sampling parameter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pdserve.common.config import ConfigError
from pdserve.common.sampling_params import ParameterError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder or .gguf file (default: packaged SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks (default: from memory)")
    g.add_argument("--kv-cache-memory", type=float, default=2.0, help="GB for the KV cache on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the device runs the current one (default: on CUDA only)")
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--quantization", "-q", default=None, choices=["fp8", "awq", "gptq", "gguf"],
                   help="weight quantization (default: the checkpoint's quantization_config, else none; "
                        "fp8 on a bf16/fp16 checkpoint quantizes at load)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: e4m3 KV cache with per-head (or per-tensor) scales, ~2x the tokens")
    g.add_argument("--kv-cache-scale", default="per-head", choices=["per-head", "per-tensor"])


def engine_kwargs(args: argparse.Namespace) -> dict:
    batched = args.max_num_batched_tokens or (8192 if args.enable_chunked_prefill else max(args.max_model_len or 8192, 8192))
    return dict(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                block_size=args.block_size, num_gpu_blocks_override=args.num_gpu_blocks_override,
                kv_cache_memory_gb=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=batched, load_format=args.load_format,
                device=args.device, enforce_eager=args.enforce_eager, served_model_name=args.served_model_name,
                async_scheduling=args.async_scheduling, quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype, kv_cache_scale=args.kv_cache_scale)


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
    llm = LLM(**engine_kwargs(args))
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
    llm = LLM(**engine_kwargs(args))
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

    from pdserve.services import bench, disagg_cli
    bench.add_parser(sub, add_engine_args)
    from pdserve.services import serve; serve.add_parser(sub, add_engine_args)
    from pdserve.services import quantize; quantize.add_parser(sub)
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
