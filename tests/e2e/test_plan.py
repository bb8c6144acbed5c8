"""`pdserve plan`: the sizing arithmetic on fixed numbers, and the command as a user runs it on the
tiny model (its printed recommendation must follow from the numbers it measured)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from pdserve.services.cli import main
from pdserve.services.plan import recommend

PREFILL = {"tok_s": 1000.0, "alone_s": 0.1}
DECODE = [{"batch": 1, "step_s": 0.01}, {"batch": 8, "step_s": 0.02}, {"batch": 32, "step_s": 0.05}]


def test_recommend_arithmetic():
    plan = recommend(PREFILL, DECODE, prompt_len=512, output_len=128, rate=4, ttft=0.5, tpot=0.03)
    # prefill: 4 * 512 = 2048 tok/s at utilisation min(0.8, 1 - 0.1/0.5) = 0.8 -> ceil(2048 / 800) = 3
    assert plan["prefill_utilization"] == 0.8 and plan["num_prefill"] == 3
    # decode: B* = 8 (20 ms <= 30 ms); concurrency 4 * 128 * 0.02 = 10.24 -> ceil(10.24 / 6.4) = 2
    assert plan["decode_batch"] == 8 and math.isclose(plan["concurrency"], 10.24) and plan["num_decode"] == 2
    assert plan["warnings"] == []
    # a tight TTFT lowers the utilisation a prefill pool may run at: 1 - 0.1/0.2 = 0.5 -> ceil(2048/500) = 5
    assert recommend(PREFILL, DECODE, 512, 128, 4, ttft=0.2, tpot=0.03)["num_prefill"] == 5
    # cached prefixes lower the prefill demand: 2048 * 0.25 = 512 -> 1
    assert recommend(PREFILL, DECODE, 512, 128, 4, 0.5, 0.03, prefix_hit_rate=0.75)["num_prefill"] == 1
    impossible = recommend(PREFILL, DECODE, 512, 128, 4, ttft=0.05, tpot=0.001)
    assert len(impossible["warnings"]) == 2 and impossible["decode_batch"] == 1


def test_plan_command_on_the_tiny_model(tiny_models, tmp_path):
    out = tmp_path / "plan.json"
    args = ["--prompt-len", "64", "--output-len", "16", "--rate", "3", "--ttft", "5", "--tpot", "1",
            "--prefill-tokens", "256", "--decode-batch-sizes", "1", "4", "--decode-steps", "3"]
    proc = subprocess.run([sys.executable, "-m", "pdserve.services.cli", "plan", "--model", tiny_models["llama"],
                           *args, "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    prefill, decode, plan = report["prefill"], report["decode"], report["plan"]
    assert prefill["tokens"] == 256 and [row["batch"] for row in decode] == [1, 4]
    assert all(row["step_s"] > 0 and math.isclose(row["tok_s"], row["batch"] / row["step_s"]) for row in decode)
    # recomputed here from what it measured
    util = min(0.8, 1 - prefill["alone_s"] / 5)
    assert plan["num_prefill"] == max(1, math.ceil(3 * 64 / (prefill["tok_s"] * util)))
    best = max((row for row in decode if row["step_s"] <= 1), key=lambda row: row["batch"])
    assert plan["decode_batch"] == best["batch"]
    assert plan["num_decode"] == max(1, math.ceil(3 * 16 * best["step_s"] / (best["batch"] * 0.8)))
    assert f"recommendation: {plan['num_prefill']} prefill : {plan['num_decode']} decode" in proc.stdout
    for line in plan["lines"]:
        assert line in proc.stdout


def test_plan_rejects_a_bad_workload(tiny_models, capsys):
    argv = ["plan", "--model", tiny_models["llama"], "--prompt-len", "64", "--output-len", "16", "--rate", "0",
            "--ttft", "1", "--tpot", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rate must be > 0" in err[0]
