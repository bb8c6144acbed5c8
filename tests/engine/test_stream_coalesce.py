"""AsyncLLM.stream coalesces the steps a lagging consumer has not taken yet into one item
(issue 11: 1P1D under load). Without it every engine step is one item, so one gRPC DecodeChunk
decode -> router and one SSE event per token, and a consumer that falls behind (the router's
event loop, a gRPC write waiting for flow control) builds a backlog that it then drains one
message per token: tokens arrive in clumps, TPOT grows with the backlog."""

from __future__ import annotations

import asyncio

from pdserve.common.config import EngineConfig
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.outputs import EngineOutput, Logprob, merge_step_outputs
from pdserve.common.sampling_params import SamplingParams

NUM_TOKENS = 24


def test_lagging_consumer_gets_queued_steps_as_one_item(tiny_models):
    """Two requests run in one batch; A's consumer takes its first item, then waits until B (read
    promptly) has finished: every later step of A is queued by then and comes as ONE item, with
    B's tokens (same prompt, greedy) and the finish on it."""
    engine = AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], dtype="float32"))
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    prompt = [1, 17, 230, 31, 9, 402, 77, 5]

    async def run():
        b_done = asyncio.Event()

        async def consume(rid: str, wait: asyncio.Event | None) -> list[list[EngineOutput]]:
            items = []
            async for outs in engine.stream(rid, prompt, params):
                items.append(outs)
                if wait is not None:
                    await wait.wait()  # the engine steps on meanwhile
            if wait is None:
                b_done.set()
            return items
        return await asyncio.gather(consume("A", b_done), consume("B", None))

    try:
        a_items, b_items = asyncio.run(run())
    finally:
        engine.shutdown()

    def tokens(items):
        return [t for outs in items for o in outs for t in o.new_token_ids]
    assert len(tokens(b_items)) == NUM_TOKENS
    assert tokens(a_items) == tokens(b_items)
    # one item taken before A's consumer waits (1 token, or 2 if a second step landed before the
    # consumer ran), then everything else as ONE item
    counts = [len(o.new_token_ids) for outs in a_items for o in outs]
    assert len(counts) == 2 and counts[0] <= 2 and sum(counts) == NUM_TOKENS, counts
    assert a_items[0][0].finish_reason is None and a_items[-1][0].finish_reason == "length"


def test_merge_step_outputs_keeps_first_reports_and_last_finish():
    lp = {5: Logprob(-0.1, 1)}
    a = [EngineOutput("r", 0, [5], [lp], num_cached_tokens=16, num_computed_prompt_tokens=3,
                      first_scheduled_time=1.0, prompt_logprobs=[None]),
         EngineOutput("r", 1, [6], [lp])]
    b = [EngineOutput("r", 1, [7], [lp], finish_reason="stop", stop_reason=2),
         EngineOutput("r", 0, [8], [lp], num_cached_tokens=None)]
    merged = merge_step_outputs(a, b)
    assert [(o.index, o.new_token_ids) for o in merged] == [(0, [5, 8]), (1, [6, 7])]
    first, second = merged
    assert (first.num_cached_tokens, first.num_computed_prompt_tokens, first.first_scheduled_time,
            first.prompt_logprobs) == (16, 3, 1.0, [None])
    assert first.finish_reason is None and len(first.new_logprobs) == 2
    assert (second.finish_reason, second.stop_reason) == ("stop", 2)
    # a sequence only the later step touched is taken as it is; the inputs are not modified
    c = merge_step_outputs([EngineOutput("r", 0, [1])], [EngineOutput("r", 1, [2], error="boom",
                                                                      finish_reason="error")])
    assert [(o.index, o.new_token_ids, o.error) for o in c] == [(0, [1], None), (1, [2], "boom")]
    assert a[0].new_token_ids == [5] and b[1].new_token_ids == [8]
