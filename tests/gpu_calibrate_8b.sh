#!/usr/bin/env bash
# Issue 13 on one GPU: `pdserve quantize` calibrating a Llama-3-8B-shape checkpoint (random bf16
# weights, std 0.02; SmolLM2's tokenizer from .tok/) with GPTQ and AWQ on CUDA: wall time and the
# GPU memory it peaks at (nvidia-smi every 0.5 s), then `pdserve generate` from each result.
# Random weights say nothing of accuracy (SmolLM2 does: docs/benchmarks.md); this is about scale.
# From the repo root inside compose/gpu/call.sh; carry .tok (bench_structured --export-tokenizer .tok).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/cal-8b
if [ ! -f "$M/config.json" ]; then
  python3 - "$M" <<'PY'
import json, os, shutil, sys, time, torch
from safetensors.torch import save_file
from pdserve.services.bench_gpu import LLAMA3_8B as C
out = sys.argv[1]; os.makedirs(out, exist_ok=True); t0 = time.time()
g = torch.Generator(device="cuda").manual_seed(0)
def rnd(*shape): return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
h, f, kv = C["hidden_size"], C["intermediate_size"], C["num_key_value_heads"] * C["head_dim"]
shard = {"model.embed_tokens.weight": rnd(C["vocab_size"], h), "lm_head.weight": rnd(C["vocab_size"], h),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
n = 0
for i in range(C["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shard.update({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                  p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                  p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                  p + "mlp.down_proj.weight": rnd(h, f),
                  p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    if i % 8 == 7 or i == C["num_hidden_layers"] - 1:
        n += 1; save_file(shard, f"{out}/model-{n:05d}.safetensors", metadata={"format": "pt"}); shard = {}
json.dump(C, open(f"{out}/config.json", "w"))
for name in os.listdir(".tok"): shutil.copy(os.path.join(".tok", name), out)
print(f"wrote {out} in {time.time() - t0:.1f} s")
PY
fi
python3 - "$M" <<'PY'
import glob, json, os, sys
from safetensors import safe_open
out = sys.argv[1]; weight_map = {}
for f in sorted(glob.glob(f"{out}/*.safetensors")):
    with safe_open(f, framework="pt") as h:
        weight_map.update({k: os.path.basename(f) for k in h.keys()})
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{out}/model.safetensors.index.json", "w"))
PY
for m in ${METHODS:-gptq awq}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "/tmp/mem-$m.txt" &
  SMI=$!
  start=$(date +%s%N)
  python3 -m pdserve.services.cli quantize --model "$M" --method "$m" --output "/tmp/cal-8b-$m" --device cuda \
    > "$OUT/quantize8b-$m.txt" 2>&1
  rc=$?
  kill $SMI
  echo "quantize 8b $m: rc=$rc $(( ($(date +%s%N) - start) / 1000000 )) ms, GPU memory peak $(sort -n "/tmp/mem-$m.txt" | tail -1) MiB; $(grep -c calibrated "$OUT/quantize8b-$m.txt") layers logged"
  tail -2 "$OUT/quantize8b-$m.txt" | cut -c1-300
  [ $rc = 0 ] || continue
  printf 'Hello\n' > /tmp/p8.txt
  python3 -m pdserve.services.cli generate --model "/tmp/cal-8b-$m" --input /tmp/p8.txt --output "$OUT/gen8b-$m.jsonl" \
    --max-tokens 8 --temperature 0 > "$OUT/gen8b-$m.log" 2>&1
  echo "generate 8b $m: rc=$? $(cut -c1-200 "$OUT/gen8b-$m.jsonl" 2>/dev/null)"; tail -2 "$OUT/gen8b-$m.log" | cut -c1-300
done
