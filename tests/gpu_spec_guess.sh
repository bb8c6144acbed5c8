#!/usr/bin/env bash
# GPU check of issue 14 (n-gram speculative decoding to 1.5x at batch 1: the verify step launched
# while a plain step runs, its drafts looked up past a guess of the token in flight, dropped when
# the guess proves wrong; verify chunks as one-token rows without per-row objects; per-request
# cool-down in batches), one H200,
# from the repo root with pdserve importable (pip install -e ".[test]" or PYTHONPATH to a pdserve tree):
#   OUT=/dir/for/results CUDA_VISIBLE_DEVICES=0 bash tests/gpu_spec_guess.sh [all|check|tests|bench|k15|stages]
# (all: <= ~9.5 min; check = tests + bench + stages, <= ~7.5 min). Every step has its own time limit; a step that fails or times out is
# reported and the next one still runs. Steps:
#   tests   pytest -m gpu tests/engine/test_spec_decode_gpu.py (the guessed verify steps through
#           the decode graphs: tokens equal a run without drafts, guesses wrong and right)
#   bench   the brief's bench, SmolLM2 bf16, k = 8 (the default), none / ngram / ngram_sync at
#           batch 1 and 16: ms/token, speedup (target >= 1.5x for ngram at batch 1), and per decode
#           step plain / verify / guess (launched while the plain step before ran): ms, host, wait,
#           launch, and guess hits. Writes $OUT/spec_k8.json.
#   k15     the same with -k 15 (at batch 1, 16 one-token rows: the same 16-row graph as k = 8;
#           the replay predicts 1.53x against 1.46x). Writes $OUT/spec_k15.json.
#   stages  bench spec --stages at batch 1 and 16: host ms per decode step by stage on this host
#           (host = step - wait - forward), for none, ngram_no_bridge and ngram. Writes $OUT/stages.json.
# Since spec8: after a verify step a bridge step launches before its result (pipeline.py), so the
# bench's split has a fourth kind (bridge); from 4 running requests the n-gram engine steps one
# at a time (ngram at batch 16 should now match ngram_sync).
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
    step bench 170 "${BENCH[@]}" --methods none ngram ngram_sync --json-out "$OUT/spec_k8.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = k15 ]; then
    step k15 100 "${BENCH[@]}" -k 15 --methods none ngram --json-out "$OUT/spec_k15.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = check ] || [ "$WHAT" = stages ]; then
    step stages 150 "$PY" -m pdserve.services.cli bench spec --stages --device cuda --dtype bfloat16 \
        --max-tokens 128 --sequential-prompts 8 --batch-sizes 1 16 --json-out "$OUT/stages.json"
fi
echo "=== finished in $(($(date +%s) - START)) s"
