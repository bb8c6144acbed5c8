"""`pdserve quantize`: write an FP8, AWQ-layout or GPTQ-layout checkpoint from an HF folder.

    pdserve quantize --model HF_FOLDER --method fp8|awq|gptq --output DIR
                     [--group-size 128] [--sym | --asym] [--act-order] [--fp8-scale channel|tensor]

The result loads in pdserve (`--quantization` is detected from its config.json) and in other
tools that read these layouts. AWQ/GPTQ are round-to-nearest without calibration data
(common/models/quantization/writer.py says what that means).
"""

from __future__ import annotations

import argparse
import json


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
    p.add_argument("--act-order", action="store_true", help="gptq: groups over inputs in descending weight-norm order")
    p.add_argument("--fp8-scale", choices=["channel", "tensor"], default="channel",
                   help="fp8: per-channel (compressed-tensors) or per-tensor (quant_method fp8) weight scales")
    p.set_defaults(func=run)


def run(args) -> None:
    from pdserve.common.config import ConfigError
    from pdserve.common.models.quantization.writer import quantize_checkpoint
    if args.group_size < 16 or args.group_size & (args.group_size - 1):
        raise ConfigError(f"--group-size must be a power of two >= 16, got {args.group_size}")
    from pdserve.common.models.loader import is_gguf, resolve_model_path
    src = resolve_model_path(args.model)
    if is_gguf(src):  # start from its weights dequantized to an fp32 HF folder
        import tempfile

        from pdserve.common.models.gguf_loader import export_hf_folder
        src = export_hf_folder(src, tempfile.mkdtemp(prefix="pdserve-gguf-export-"))
    summary = quantize_checkpoint(src, args.output, args.method, group_size=args.group_size, sym=args.sym,
                                  act_order=args.act_order, fp8_per_tensor=args.fp8_scale == "tensor")
    print(json.dumps({"output": args.output, **summary}))
