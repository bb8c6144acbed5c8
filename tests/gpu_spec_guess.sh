#!/usr/bin/env bash
# GPU check of issue 14 (n-gram speculative decoding to 1.5x at batch 1), one H200,
# from the repo root with pdserve importable (pip install -e ".[test]" or PYTHONPATH to a pdserve tree):
#   OUT=/dir/for/results CUDA_VISIBLE_DEVICES=0 bash tests/gpu_spec_guess.sh [all|check|tests|bench|k15|stages|graphs]
# (all: <= ~9.5 min; check = tests + bench + stages + graphs). Every step has its own time limit; a
# step that fails or times out is reported and the next one still runs. Steps:
#   tests   pytest -m gpu tests/engine/test_spec_decode_gpu.py (verify steps through the decode
#           graphs and their tail: tokens equal a run without drafts; the overlapped flow's guessed
#           and bridge steps, off by default, with its policy lifted)
#   bench   the brief's bench, SmolLM2 bf16, k = 8 (the default), none / ngram (steps one at a time,
#           the default) / ngram_overlap (overlapped below 4 requests) / draft (self) at batch 1 and
#           16, and draft_sync (the drafts read on the host before the verify step launches):
#           ms/token, speedup (target >= 1.5x for ngram at batch 1), and per decode step
#           plain / verify / guess / bridge: ms, host, wait, launch. Writes $OUT/spec_k8.json.
#   k15     ngram with -k 15. Writes $OUT/spec_k15.json.
#   stages  bench spec --stages at batch 1 and 16: host ms per decode step by stage on this host
#           (host = step - wait - forward), for none, ngram, draft and draft_sync. Writes $OUT/stages.json.
#   graphs  bench graphs: GPU ms of a decode step per graph batch size, gemv_rows as chosen vs
#           cuBLAS for 2+ rows, with the verify sizes of k = 8. Writes $OUT/graphs.json.
source "$(dirname "$0")/gpu_step.sh"  # OUT, WHAT (the first argument), PY, START; step NAME LIMIT_S COMMAND...
BENCH=("$PY" -m pdserve.services.cli bench spec --device cuda --batch-sizes 1 16 --max-tokens 128
       --sequential-prompts 8 --dtype bfloat16)

if [ "$WHAT" = all ] || [ "$WHAT" = check ] || [ "$WHAT" = tests ]; then
    # per test: its time (--durations), a stack dump at 40 s (faulthandler_timeout) and the hard
    # 60 s limit of the file's timeout mark (every thread's stack, then the run ends)
    step tests 170 "$PY" -m pytest -q -p no:cacheprovider -m gpu --durations=0 -o faulthandler_timeout=40 \
        tests/engine/test_spec_decode_gpu.py
fi
if [ "$WHAT" = all ] || [ "$WHAT" = check ] || [ "$WHAT" = bench ]; then
    step bench 200 "${BENCH[@]}" --methods none ngram ngram_overlap draft draft_sync --json-out "$OUT/spec_k8.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = k15 ]; then
    step k15 100 "${BENCH[@]}" -k 15 --methods none ngram --json-out "$OUT/spec_k15.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = check ] || [ "$WHAT" = stages ]; then
    step stages 150 "$PY" -m pdserve.services.cli bench spec --stages --device cuda --dtype bfloat16 \
        --max-tokens 128 --sequential-prompts 8 --batch-sizes 1 16 --methods none ngram draft draft_sync \
        --json-out "$OUT/stages.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = check ] || [ "$WHAT" = graphs ]; then
    step graphs 100 "$PY" -m pdserve.services.cli bench graphs --device cuda --dtype bfloat16 --max-num-seqs 32 \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 8}' --json-out "$OUT/graphs.json"
fi
echo "=== finished in $(($(date +%s) - START)) s"
