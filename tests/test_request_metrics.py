"""A worker's request metrics counted in batches (common/request_metrics.py MetricsBatch,
common/metrics.py observe_many): the same exported histograms and counters as one observe() /
inc() per token, which the decode worker's DecodeStream replaced with one flush per message."""

import random

from prometheus_client.parser import text_string_to_metric_families

from pdserve.common.metrics import ITL_BUCKETS, ServerMetrics, observe_many
from pdserve.common.outputs import EngineOutput
from pdserve.common.request_metrics import DeltaTracker, MetricsBatch


def samples(m: ServerMetrics, prefix: str) -> dict:
    text = m.render().decode()
    return {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")}


def test_observe_many_matches_observe_value_by_value():
    rng = random.Random(0)
    # every bucket, its exact bounds (a value equal to a bound belongs to it), past the last one (+Inf)
    values = [rng.uniform(0, 2 * ITL_BUCKETS[-1]) for _ in range(500)] + list(ITL_BUCKETS) + [0.0]
    one, many = ServerMetrics("m", 1024), ServerMetrics("m", 1024)
    for v in values:
        one.itl.observe(v)
    observe_many(many.itl, values[:100])
    observe_many(many.itl, [])
    observe_many(many.itl, values[100:])
    a, b = samples(one, "vllm:inter_token_latency"), samples(many, "vllm:inter_token_latency")
    assert a.keys() == b.keys() and len(a) == len(ITL_BUCKETS) + 3  # buckets, +Inf, count, sum
    for key in a:
        assert abs(a[key] - b[key]) < 1e-9, key


def test_trackers_with_a_batch_count_what_they_count_alone():
    """Three requests' coalesced deltas through one MetricsBatch per message (as DecodeMux does)
    and through plain observe(): the same tokens, ITL histogram, TTFT and finish counts."""
    alone, batched = ServerMetrics("m", 1024), ServerMetrics("m", 1024)
    trackers = {m: [DeltaTracker(m, 100.0, 8, 1) for _ in range(3)] for m in (alone, batched)}
    messages = [(100.5, [[5, 6], [7], []]), (100.8, [[8, 9, 10], [11], [12]]), (101.0, [[13], [14, 15], [16]])]
    for now, news in messages:
        batch = MetricsBatch(batched, now)
        for i, tokens in enumerate(news):
            if not tokens:
                continue
            finish = "length" if now == 101.0 else None
            outs = [EngineOutput(f"r{i}", 0, tokens, finish_reason=finish)]
            trackers[alone][i].observe(outs, now)
            trackers[batched][i].observe(outs, now, batch)
        batch.flush()
    for prefix in ("vllm:inter_token_latency", "vllm:generation_tokens", "vllm:time_to_first_token",
                   "vllm:request_success", "vllm:e2e_request_latency"):
        a, b = samples(alone, prefix), samples(batched, prefix)
        assert a.keys() == b.keys() and a, prefix
        for key in a:
            assert abs(a[key] - b[key]) < 1e-9, (prefix, key)
    assert samples(batched, "vllm:generation_tokens")[("vllm:generation_tokens_total", None)] == 12


def test_stat_logger_lines_are_interval_rates():
    """The periodic statistics line: rates from the counters' deltas over the interval, gauges as
    of its end, nothing for the first call or a quiet interval; spec decode acceptance where
    drafts were verified."""
    from pdserve.common.stat_logger import StatLogger
    from pdserve.common.stats import EngineStats, SpecDecodeStats
    logger = StatLogger(lambda: None, "Engine")
    assert logger.line(EngineStats(num_prompt_tokens=100, num_generated_tokens=10), 0.0) is None  # the start
    assert logger.line(EngineStats(num_prompt_tokens=100, num_generated_tokens=10), 10.0) is None  # quiet
    line = logger.line(EngineStats(num_prompt_tokens=2100, num_generated_tokens=510, num_running=3, num_waiting=1,
                                   kv_usage=0.25, prefix_queries=400, prefix_hits=100), 20.0)
    assert line == ("Engine: Avg prompt throughput: 200.0 tokens/s, Avg generation throughput: 50.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%")
    spec = SpecDecodeStats(num_drafts=10, num_draft_tokens=40, num_accepted_tokens=20)
    logger.line(EngineStats(num_prompt_tokens=2100, num_generated_tokens=510, spec_decode=spec), 30.0)
    more = SpecDecodeStats(num_drafts=20, num_draft_tokens=80, num_accepted_tokens=50)
    line = logger.line(EngineStats(num_prompt_tokens=2100, num_generated_tokens=570, num_running=1, spec_decode=more),
                       40.0)
    assert line.endswith("Spec decode acceptance: 75.0%, mean accepted length: 4.00")
