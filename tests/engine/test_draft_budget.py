"""The n-gram draft budget (spec_decode/budget.py): the step-cost fit, the drafts it feeds, and
engines on CPU with it: greedy tokens unchanged whatever it feeds, drafts not fed when their rows
cost more than they yield, all fed when rows are free."""

from __future__ import annotations

import pytest

from pdserve.common.config import ConfigError, SpeculativeConfig
from pdserve.common.engine.llm import LLM
from pdserve.common.engine.spec_decode.budget import MIN_STEPS, DraftBudget
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_spec_decode import generate, tokens
from tests.engine.test_spec_decode_overlap import small_vocab  # noqa: F401 (a fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def budget_config(policy: str) -> dict:
    return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "draft_budget": policy}


def test_the_step_cost_fit_recovers_a_linear_cost():
    budget = DraftBudget()
    for i in range(MIN_STEPS - 1):
        budget.observe_step(1 + 7 * (i % 2), 0.020 + 0.001 * (1 + 7 * (i % 2)))
    assert budget.cost_model() is None  # too few steps yet
    budget.observe_step(8, 0.028)
    a, b = budget.cost_model()
    assert a == pytest.approx(0.020, rel=1e-6) and b == pytest.approx(0.001, rel=1e-6)
    same = DraftBudget()
    for _ in range(2 * MIN_STEPS):
        same.observe_step(16, 0.030)
    assert same.cost_model() is None  # every step the same size: no slope to fit


def trained(a: float, b: float) -> DraftBudget:
    budget = DraftBudget()
    for i in range(4 * MIN_STEPS):
        tokens = 1 + 15 * (i % 2)
        budget.observe_step(tokens, a + b * tokens)
    return budget


def test_drafts_are_fed_while_they_yield_more_than_their_rows_cost():
    # rows nearly free (a GPU-like step): every draft fed
    cheap = trained(0.020, 1e-6)
    assert cheap.limits({"x": 4, "y": 4}, num_tokens=2, num_sampling=2) == {"x": 4, "y": 4}
    # a CPU-like step (20 ms + 1 ms a token, 16 requests): a row must bring > ~0.44 tokens
    cpu = trained(0.020, 0.001)
    offered = {f"r{i}": 4 for i in range(16)}
    for _ in range(30):  # "good" copies its input (every draft accepted); the others never match
        cpu.observe_round("good", 4, 4)
        for i in range(16):
            cpu.observe_round(f"r{i}", 4, 0)
    fed = cpu.limits({**offered, "good": 4}, num_tokens=17, num_sampling=17)
    assert fed["good"] == 4 and all(fed[f"r{i}"] == 0 for i in range(16))
    assert cpu.num_trimmed == 64
    # its gains fall with the position: draft j + 1 is never fed without draft j
    gains = cpu.gains("good", 4)
    assert gains == sorted(gains, reverse=True) and gains[0] > 0.9
    # no fit yet: no limits (every draft fed, as without a budget)
    assert DraftBudget().limits({"x": 4}, num_tokens=1, num_sampling=1) is None
    cpu.forget(["good"])
    assert cpu.gains("good", 1)[0] < 0.5  # back to everyone's rate (mostly rejected)


def test_draft_budget_config():
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).draft_budget == "auto"
    with pytest.raises(ConfigError, match="draft_budget must be one of auto, cost, all"):
        SpeculativeConfig.parse(budget_config("some"))
    with pytest.raises(ConfigError, match="draft_budget applies to method ngram only"):
        SpeculativeConfig.parse({"model": "m", "num_speculative_tokens": 2, "draft_budget": "cost"})


def test_cpu_engines_budget_ngram_drafts_and_verify_as_rows(small_vocab):
    folder, prompts = small_vocab
    auto = LLM(folder, dtype="float32", speculative_config=budget_config("auto"))
    assert auto.engine.runner.spec.budget is not None and auto.engine.runner.spec.verify_as_decodes
    auto.shutdown()
    every = LLM(folder, dtype="float32", speculative_config=budget_config("all"))
    assert every.engine.runner.spec.budget is None
    every.shutdown()


@pytest.mark.parametrize("rows", ["dear", "free", "measured"])
def test_greedy_tokens_do_not_depend_on_the_budget(small_vocab, rows):
    """Rows pinned dear (no draft is worth one: every step plain), free (every draft fed) or the
    engine's own timing: the tokens are plain decoding's and no block leaks (generate checks)."""
    folder, prompts = small_vocab
    plain, _ = generate(folder, prompts, GREEDY)
    pinned = {"dear": (0.001, 10.0), "free": (0.020, 1e-9)}.get(rows)
    llm_kw = dict(check_blocks=True, speculative_config=budget_config("cost"), block_size=4)
    if pinned is None:
        spec, engine = generate(folder, prompts, GREEDY, **llm_kw)
    else:
        spec, engine = generate(folder, prompts, GREEDY, pin_cost=pinned, **llm_kw)
    assert tokens(spec) == tokens(plain)
    budget, st = engine.runner.spec.budget, engine.stats().spec_decode
    if rows == "dear":
        assert st.num_draft_tokens == 0 and budget.num_trimmed > 0
    elif rows == "free":
        assert st.num_draft_tokens > 0 and budget.num_trimmed == 0
