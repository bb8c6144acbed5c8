"""`pdserve quantize`: write an FP8, AWQ-layout or GPTQ-layout checkpoint from an HF folder.

    pdserve quantize --model HF_FOLDER --method fp8|awq|gptq --output DIR
                     [--group-size 128] [--sym | --asym] [--[no-]act-order] [--fp8-scale channel|tensor]
                     [--calibration-data FILE] [--calibration-samples 128] [--calibration-seq-len 512]
                     [--rtn] [--kv-cache-scales] [--device cuda|cpu]

The result loads in pdserve (`--quantization` is detected from its config.json) and in other
tools that read these layouts. AWQ and GPTQ run on calibration text (the project's own unless
--calibration-data names a file; common/models/quantization/calibrate.py); --rtn rounds to
nearest without it.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write an fp8 / AWQ / GPTQ checkpoint from an HF folder")
    p.add_argument("--model", required=True, help="HF folder (config.json + *.safetensors) or a .gguf file "
                                                  "(dequantized first)")
    p.add_argument("--method", required=True, choices=["fp8", "awq", "gptq"], help="checkpoint layout to write")
    p.add_argument("--output", required=True, help="folder to write (created)")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale (awq, gptq)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric int4 (default: gptq sym, awq asym); --no-sym = --asym")
    p.add_argument("--asym", dest="sym", action="store_false", help="zero points (asymmetric int4) instead of symmetric")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: quantize inputs in descending order of importance (diag of H; with --rtn a "
                        "weight-norm proxy) and form the groups in that order (default: on when calibrated)")
    p.add_argument("--fp8-scale", choices=["channel", "tensor"], default="channel",
                   help="fp8: per-channel (compressed-tensors) or per-tensor (quant_method fp8) weight scales")
    p.add_argument("--calibration-data", default=None, metavar="FILE",
                   help="awq/gptq: UTF-8 text to calibrate on (default: services/data/calibration_text.txt)")
    p.add_argument("--calibration-samples", type=int, default=128, help="awq/gptq: pieces of the text to use, at most")
    p.add_argument("--calibration-seq-len", type=int, default=512, help="awq/gptq: tokens per piece")
    p.add_argument("--rtn", action="store_true", help="awq/gptq: round to nearest, no calibration")
    p.add_argument("--lm-head", action="store_true",
                   help="gptq: quantize the LM head too (round to nearest; the config says \"lm_head\": true, "
                        "as GPTQModel's lm_head=True)")
    p.add_argument("--kv-cache-scales", action="store_true",
                   help="fp8: also write static fp8 KV-cache scales (self_attn.k_scale / v_scale) found on the "
                        "calibration text; `--kv-cache-dtype fp8` then uses them instead of calibrating at start-up")
    p.add_argument("--device", default=None, help="where calibration runs (default: cuda if there is one, else cpu)")
    p.set_defaults(func=run)


def run(args) -> None:
    from pdserve.common.config import ConfigError
    from pdserve.common.models.quantization.writer import quantize_checkpoint
    if args.group_size < 16 or args.group_size & (args.group_size - 1):
        raise ConfigError(f"--group-size must be a power of two >= 16, got {args.group_size}")
    from pdserve.common.models.quantization.calibrate import Calibration
    calibrated = args.method in ("awq", "gptq") and not args.rtn
    if args.rtn and args.method == "fp8":
        raise ConfigError("--rtn is an awq/gptq option (fp8 is never calibrated)")
    if args.kv_cache_scales and args.method != "fp8":
        raise ConfigError("--kv-cache-scales goes with --method fp8")
    if not calibrated and args.calibration_data and not args.kv_cache_scales:
        raise ConfigError("--calibration-data is for awq/gptq without --rtn, or fp8 with --kv-cache-scales")
    if args.calibration_samples < 1 or args.calibration_seq_len < 16:
        raise ConfigError("--calibration-samples must be >= 1 and --calibration-seq-len >= 16")
    act_order = args.act_order
    if act_order is None:  # GPTQ without act-order lost to RTN on SmolLM2 (docs/quantization.md)
        act_order = args.method == "gptq" and calibrated
    calibration = Calibration(text=args.calibration_data, num_samples=args.calibration_samples,
                              seq_len=args.calibration_seq_len, device=args.device) if calibrated else None
    from pdserve.common.models.loader import is_gguf, resolve_model_path
    src = resolve_model_path(args.model)
    if is_gguf(src):  # start from its weights dequantized to an fp32 HF folder
        import tempfile

        from pdserve.common.models.gguf_loader import export_hf_folder
        src = export_hf_folder(src, tempfile.mkdtemp(prefix="pdserve-gguf-export-"))
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    kv_scales = None
    if args.kv_cache_scales:
        from pdserve.common.models.quantization.kv_cache import text_kv_scales
        kv_scales = text_kv_scales(src, args.calibration_data, args.calibration_samples, args.calibration_seq_len,
                                   args.device, log=log)
    summary = quantize_checkpoint(src, args.output, args.method, group_size=args.group_size, sym=args.sym,
                                  act_order=act_order, fp8_per_tensor=args.fp8_scale == "tensor",
                                  calibration=calibration, log=log, kv_scales=kv_scales, lm_head=args.lm_head)
    print(json.dumps({"output": args.output, **summary}))
