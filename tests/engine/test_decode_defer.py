"""Decode deferral (SchedulerConfig.decode_defer_steps): while prompts wait, running requests'
decodes may sit out up to N steps in a row so that the prompts get the whole step.

The real Scheduler and KVCacheManager, no model: each step's sampled rows get a token, as a
runner would give them. The greedy outputs under deferral are checked against HF in
test_correctness.py (variant "decode_defer").
"""

from __future__ import annotations

import pytest

from pdserve.common.config import CPU_DECODE_DEFER_STEPS, ConfigError, SchedulerConfig
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.outputs import RunnerOutput
from pdserve.common.engine.scheduler import Scheduler
from pdserve.common.request import Request
from pdserve.common.sampling_params import SamplingParams


def burst(defer: int | None, n: int = 12, prompt: int = 40, budget: int = 64, max_tokens: int = 6,
          num_blocks: int = 400, max_num_seqs: int = 256) -> tuple[list[tuple[int, int]], Scheduler]:
    """n prompts at once -> per step (prompt tokens, decodes) until all finish."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, decode_defer_steps=defer,
                                      max_num_seqs=max_num_seqs), KVCacheManager(num_blocks, 16))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        sched.add_request(Request(f"r{i}", [100 + i * 7 + j for j in range(prompt)], params))
    steps = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.scheduled, "a step with nothing to run while requests are unfinished"
        prompt_tokens = sum(len(s.input_token_ids) for s in out.scheduled if s.start_pos < len(s.prompt_token_ids))
        steps.append((prompt_tokens, len(out.scheduled) - sum(s.start_pos < len(s.prompt_token_ids) for s in out.scheduled)))
        sched.update(out, RunnerOutput(sampled_token_ids={s.req_id: 5 for s in out.scheduled if s.sample}))
        assert len(steps) < 1000
    assert sched.kv.num_requests() == 0
    return steps, sched


def test_deferral_by_default_only_on_a_bf16_cpu_server():
    assert SchedulerConfig().decode_defer_limit == 0
    assert SchedulerConfig(on_cpu=True, offline=True).decode_defer_limit == 0
    assert SchedulerConfig(on_cpu=True).decode_defer_limit == 0  # fp32
    assert SchedulerConfig(on_cpu=True, half_precision=True).decode_defer_limit == CPU_DECODE_DEFER_STEPS
    assert SchedulerConfig(on_cpu=True, half_precision=True, decode_defer_steps=0).decode_defer_limit == 0
    assert SchedulerConfig(decode_defer_steps=2).decode_defer_limit == 2
    with pytest.raises(ConfigError, match="--decode-defer-steps"):
        SchedulerConfig(decode_defer_steps=-1)


def test_zero_keeps_decodes_in_every_step():
    steps, _ = burst(0)
    assert steps == burst(None)[0]
    # 12 x 40 prompt tokens at 64 a step: decodes ride along from the second step on
    assert any(p and d for p, d in steps)


@pytest.mark.parametrize("defer", [1, 3, 100])
def test_decodes_sit_out_at_most_n_steps_while_prompts_wait(defer):
    steps, sched = burst(defer)
    base, _ = burst(0)
    in_row, prompt_steps_with_decodes = 0, 0
    total_prompt = sum(p for p, _ in steps)
    seen = 0
    for p, d in steps:
        decoding = seen >= 40  # the first prompt ended in an earlier step
        seen += p
        if seen < total_prompt:  # prompts still waiting after this step
            if d == 0 and decoding:  # the running requests sat out
                in_row += 1
                assert in_row <= defer
            else:
                in_row = 0
                prompt_steps_with_decodes += d > 0
    assert total_prompt == sum(p for p, _ in base) == 12 * 40
    assert sum(d for _, d in steps) == sum(d for _, d in base) == 12 * 5  # every token decoded once
    if defer >= 100:  # prompts first: no decode before the last prompt's step
        assert prompt_steps_with_decodes == 0
        last_prompt_step = max(i for i, (p, _) in enumerate(steps) if p)
        assert steps[last_prompt_step][1] > 0  # the budget the last prompts left carries decodes
    assert sched.num_decode_defers == 0


def test_decodes_run_when_no_prompt_can_be_admitted():
    # max_num_seqs 4: the waiting prompts cannot start until a running request finishes, so
    # deferring the decodes would leave nothing to run
    steps, _ = burst(100, n=8, max_num_seqs=4)
    assert sum(d for _, d in steps) == 8 * 5
    # a KV pool that holds only some requests: admission stops at the pool, decodes go on
    steps, _ = burst(100, n=12, num_blocks=12)
    assert sum(d for _, d in steps) == 12 * 5
