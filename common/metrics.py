"""Prometheus metrics with vLLM's names and labels, for every process that serves `/metrics`
(torch-free: `pdserve serve`, the router, and the prefill/decode workers).

Two sources:
  * state read at scrape time from typed snapshots (common/stats.py) that the deployment supplies:
    `EngineStats` (running / waiting, KV usage, prefix cache, preemptions, token counters,
    speculative decoding's drafts and acceptances: the engine of `serve` or a worker, or the
    router's sums over its fleet), `TransferStats` (a
    worker's leases and pulls), `RouterStats` (routing decisions, retries, handoffs) — nothing is
    polled between scrapes;
  * request-level metrics (token counters, TTFT, inter-token latency, end-to-end latency, request
    sizes, finish reasons) observed by the OpenAI front end as outputs reach it, one
    `RequestTracker` per engine request, O(1) work per output.

Each `ServerMetrics` owns its registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import time
from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pdserve.common.outputs import RequestOutput
from pdserve.common.request import FINISH_REASON_NAMES
from pdserve.common.stats import EngineStats, GpuStats, RouterStats, TransferStats

log = logging.getLogger("pdserve.metrics")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's build_1_2_5_buckets)."""
    buckets, exp = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exp
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exp += 1


class ServerMetrics:
    """`shared_dir`: the folder of prometheus_client's multiprocess mode, for processes that serve
    one endpoint together (`pdserve router --workers N`): the request-level counters and
    histograms are then kept in files there and /metrics sums them over every process; the
    state collector (fleet gauges, routing counters) and the process's own metrics describe the
    process that answers. The mode must be on before prometheus_client is imported (its value
    class is chosen then: the parent sets PROMETHEUS_MULTIPROC_DIR for its spawned children)."""

    def __init__(self, model_name: str, max_model_len: int, collector: "StatsCollector | None" = None,
                 shared_dir: str | None = None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._merged = None if shared_dir is None else _merged_registry(shared_dir, collector)
        r, labels, name = self.registry, ["model_name"], model_name
        _add_process_collectors(r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=r).labels(name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels,
                                         registry=r).labels(name)
        success = Counter("vllm:request_success", "Finished requests (one per choice), by finish reason.",
                          labels + ["finished_reason"], registry=r)
        self.request_success = {reason: success.labels(name, reason) for reason in FINISH_REASON_NAMES}
        self._success = success
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", labels,
                              buckets=LATENCY_BUCKETS, registry=r).labels(name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             labels, buckets=E2E_BUCKETS, registry=r).labels(name)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Seconds from arrival to first being scheduled (engines only: serve, workers).",
                                    labels, buckets=E2E_BUCKETS, registry=r).labels(name)
        sizes = token_buckets(max_model_len or 8192)  # a fleet's length may be unknown at start-up
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               labels, buckets=sizes, registry=r).labels(name)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request (per choice).", labels,
                                                   buckets=sizes, registry=r).labels(name)
        if collector is not None:
            r.register(collector)

    def finished(self, reason: str | None) -> None:
        child = self.request_success.get(reason or "stop")
        if child is None:
            child = self.request_success[reason] = self._success.labels(self.model_name, reason)
        child.inc()

    def track(self, arrival_time: float | None = None) -> "RequestTracker":
        return RequestTracker(self, arrival_time or time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry if self._merged is None else self._merged)

    def serve_http(self, host: str, port: int):
        """Serve this registry's /metrics from a thread (workers have no HTTP app); returns the
        server (`server_port`, `shutdown()`)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


def _add_process_collectors(registry: CollectorRegistry) -> None:
    """The process's own metrics: python_gc_* (collections per generation: common/gc_policy.py),
    process_cpu_seconds_total, resident memory, open fds."""
    GCCollector(registry=registry)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def _merged_registry(shared_dir: str, collector) -> CollectorRegistry:
    from prometheus_client import multiprocess, values
    if values.ValueClass.__name__ == "MutexValue":  # single-process values: nothing would reach the files
        raise RuntimeError("prometheus_client was imported before its multiprocess mode was set "
                           f"(PROMETHEUS_MULTIPROC_DIR={shared_dir})")
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=shared_dir)
    _add_process_collectors(merged)  # the answering process's
    if collector is not None:
        merged.register(collector)
    return merged


class RequestTracker:
    """Request-level metrics of one engine request (one prompt, n choices) from its outputs."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float):
        self.m = metrics
        self.arrival_time = arrival_time
        self.num_prompt_tokens: int | None = None
        self.num_tokens: list[int] = []  # per choice: tokens seen
        self.last_token_time: list[float] = []
        self.finished: list[bool] = []
        self.done = False
        self.queued = False

    def observe(self, out: RequestOutput, now: float) -> None:
        m = self.m
        scheduled = out.metrics.first_scheduled_time if out.metrics is not None else None
        if scheduled is not None and not self.queued:  # known where the engine is in-process (serve)
            self.queued = True
            m.queue_time.observe(max(scheduled - self.arrival_time, 0.0))
        if self.num_prompt_tokens is None:
            self.num_prompt_tokens = len(out.prompt_token_ids)
            m.prompt_tokens.inc(self.num_prompt_tokens)
            m.request_prompt_tokens.observe(self.num_prompt_tokens)
            n = len(out.outputs)
            self.num_tokens, self.last_token_time, self.finished = [0] * n, [now] * n, [False] * n
        for c in out.outputs:
            i = c.index
            num_new = len(c.token_ids) - self.num_tokens[i]
            if num_new > 0:
                m.generation_tokens.inc(num_new)
                if self.num_tokens[i] == 0 and i == 0:
                    m.ttft.observe(_ttft(out, now, self.arrival_time))
                observe_itl(m, num_new, now - self.last_token_time[i], self.num_tokens[i] == 0)
                self.num_tokens[i] += num_new
                self.last_token_time[i] = now
            if c.finish_reason is not None and not self.finished[i]:
                self.finished[i] = True
                m.finished(c.finish_reason)
                m.request_generation_tokens.observe(self.num_tokens[i])
        if out.finished and not self.done:
            self.done = True
            m.e2e.observe(now - self.arrival_time)

    def close(self, reason: str = "abort") -> None:
        """The request ended early (client gone, error): count its unfinished choices. One that
        never produced an output (rejected, or abandoned while queued) is not counted."""
        if self.done:
            return
        self.done = True
        count_unfinished(self.m, self.finished, self.num_tokens, reason)


def itl_gaps(num_new: int, since_last_s: float, first_of_sequence: bool) -> tuple[int, float]:
    """One inter-token latency per token after a sequence's first, however many tokens an output
    carries (decode coalesces steps, --stream-interval-ms): the output's gap spread evenly over
    its tokens; tokens that arrived with the sequence's first one count 0. -> (count, gap)."""
    return (num_new - 1, 0.0) if first_of_sequence else (num_new, since_last_s / num_new)


def observe_itl(m: ServerMetrics, num_new: int, since_last_s: float, first_of_sequence: bool) -> None:
    gaps, gap_s = itl_gaps(num_new, since_last_s, first_of_sequence)
    for _ in range(gaps):
        m.itl.observe(gap_s)


def observe_many(histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for every v, as one increment per bucket hit and one of the sum
    (the decode worker observes an inter-token latency per output token: ~3 us each through
    observe(), which takes two locks and walks the bounds). Reads prometheus_client's Histogram
    internals (_upper_bounds, _buckets, _sum; tests/test_request_metrics.py checks them against
    observe()); a client without them gets observe() per value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None or not hasattr(histogram, "_buckets") or not hasattr(histogram, "_sum"):
        for v in values:
            histogram.observe(v)
        return
    if not values:
        return
    histogram._sum.inc(sum(values))
    # observe() counts v in the first bucket whose bound is >= v: bisect_left's index
    for i, n in collections.Counter(map(functools.partial(bisect.bisect_left, bounds), values)).items():
        histogram._buckets[i].inc(n)


def count_unfinished(m: ServerMetrics, finished: list[bool], num_tokens: list[int], reason: str) -> None:
    """A request ended early: its sequences still running finish with `reason`."""
    for i, done in enumerate(finished):
        if not done:
            m.finished(reason)
            m.request_generation_tokens.observe(num_tokens[i])


def _ttft(out: RequestOutput, now: float, arrival_time: float) -> float:
    metrics = out.metrics
    if metrics is not None and metrics.first_token_time is not None and metrics.arrival_time:
        return max(metrics.first_token_time - metrics.arrival_time, 0.0)
    return now - arrival_time


class StatsCollector:
    """Snapshots read at scrape time; a failing source leaves its series out of that scrape."""

    def __init__(self, model_name: str, engine: Callable[[], EngineStats] | None = None,
                 transfer: Callable[[], TransferStats] | None = None,
                 router: Callable[[], RouterStats] | None = None, redis_up: Callable[[], bool] | None = None,
                 gpu: Callable[[], GpuStats] | None = None):
        self.model_name = model_name
        self.sources = {"engine": engine, "transfer": transfer, "router": router, "redis_up": redis_up, "gpu": gpu}
        self.pull_latency = _HistogramFamily("pdserve:kv_pull_seconds", "Seconds per KV pull (decode side).",
                                             LATENCY_BUCKETS, model_name)

    def _read(self, name: str):
        source = self.sources[name]
        if source is None:
            return None
        try:
            return source()
        except Exception:
            log.exception("reading %s stats for /metrics failed", name)
            return None

    def collect(self):
        labels = [self.model_name]

        def gauge(name: str, doc: str, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        def counter(name: str, doc: str, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, float(value))
            return c

        e = self._read("engine")
        if e is not None:
            yield gauge("vllm:num_requests_running", "Requests in the running batch.", e.num_running)
            yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", e.num_waiting)
            yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", e.kv_usage)
            yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (older name); 1 means 100 percent.", e.kv_usage)
            yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", e.prefix_queries)
            yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.prefix_hits)
            yield counter("vllm:num_preemptions", "Preemptions (recompute) so far.", e.num_preemptions)
            yield gauge("pdserve:kv_blocks_free", "Free KV blocks.", e.num_free_blocks)
            yield gauge("pdserve:kv_blocks_total", "KV blocks in the pool (each tensor-parallel rank holds them "
                                                   "for its KV heads).", e.num_blocks)
            yield gauge("pdserve:tensor_parallel_size", "Ranks (processes / GPUs) the model is split over.",
                        e.tensor_parallel_size)
            if e.kv_blocks_fit_by_rank:
                fit = GaugeMetricFamily("pdserve:kv_blocks_fit", "KV blocks each rank's memory could hold (the "
                                        "pool is their minimum).", labels=["model_name", "rank"])
                for rank, num in enumerate(e.kv_blocks_fit_by_rank):
                    fit.add_metric([self.model_name, str(rank)], float(num))
                yield fit
            if e.spec_decode is not None:
                yield from self._spec_decode(e.spec_decode, counter, gauge)
        t = self._read("transfer")
        if t is not None:
            for key, name, doc in (
                    ("leases_granted", "pdserve:kv_leases_granted", "Prompt KV leases granted to decode workers."),
                    ("leases_released", "pdserve:kv_leases_released", "Leases released by their decode worker."),
                    ("leases_expired", "pdserve:kv_leases_expired", "Leases that expired before a release."),
                    ("bytes_sent", "pdserve:kv_transfer_sent_bytes", "KV bytes served to pulling decode workers."),
                    ("pulls_served", "pdserve:kv_pulls_served", "Pulls served to decode workers."),
                    ("serve_failures", "pdserve:kv_pull_serve_failures", "Pulls that failed on the serving side."),
                    ("pulls", "pdserve:kv_pulls", "KV pulls made by this decode worker."),
                    ("pull_failures", "pdserve:kv_pull_failures", "Pulls that failed (the prompt was recomputed)."),
                    ("bytes_received", "pdserve:kv_transfer_received_bytes", "KV bytes pulled from prefill workers."),
                    ("pull_seconds", "pdserve:kv_transfer_seconds", "Seconds spent pulling KV.")):
                yield counter(name, doc, getattr(t, key))
            yield gauge("pdserve:kv_leases_active", "Leases holding prompt KV now.", t.leases_active)
            self.pull_latency.observe(t.new_pull_latencies)
            yield self.pull_latency.family()
        g = self._read("gpu")
        if g is not None:
            for key, name, doc in (("memory_used_bytes", "pdserve:gpu_memory_used_bytes", "GPU memory in use (NVML, whole device)."),
                                   ("memory_total_bytes", "pdserve:gpu_memory_total_bytes", "GPU memory in all (NVML)."),
                                   ("utilization", "pdserve:gpu_utilization_perc", "GPU busy fraction (NVML); 1 means 100 percent.")):
                family = GaugeMetricFamily(name, doc, labels=["model_name", "gpu"])
                family.add_metric([self.model_name, str(g.index)], float(getattr(g, key)))
                yield family
        up = self._read("redis_up")
        if up is not None:  # the disaggregated router: 0 while it routes on load alone
            yield gauge("pdserve:redis_up", "1 while the router reaches Redis, 0 while it routes on load alone.", up)
        r = self._read("router")
        if r is not None:
            for key, name, doc in (("kv_bytes", "pdserve:kv_transfer_bytes", "KV bytes pulled by decode for this router's requests."),
                                   ("handoffs", "pdserve:kv_handoffs", "Requests whose prompt KV was pulled from a prefill."),
                                   ("decode_resubmits", "pdserve:decode_resubmits", "Requests moved to another decode after a failure."),
                                   ("decodes_on_prefill", "pdserve:decodes_on_prefill", "Requests decoded on a prefill instance while no decode instance served."),
                                   ("prefill_retries", "pdserve:prefill_retries", "Prefill calls retried on another instance.")):
                yield counter(name, doc, getattr(r, key))
            routes = CounterMetricFamily("pdserve:routing_decisions", "Routing decisions by reason.",
                                         labels=["model_name", "reason"])
            for reason, count in sorted(r.routes.items()):
                routes.add_metric([self.model_name, reason], float(count))
            yield routes


    def _spec_decode(self, sd, counter, gauge):
        """vLLM's spec_decode counters, and the two ratios its logger prints as pdserve gauges."""
        yield counter("vllm:spec_decode_num_drafts", "Speculative verify rounds (one per request and step).",
                      sd.num_drafts)
        yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", sd.num_draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", sd.num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "position"])
        for pos, count in enumerate(sd.accepted_per_pos):
            per_pos.add_metric([self.model_name, str(pos)], float(count))
        yield per_pos
        yield counter("pdserve:spec_decode_num_guessed_drafts", "Verify rounds whose drafts were looked up past "
                      "a guess of the token in flight (n-gram, a step launched before the previous result).",
                      sd.num_guessed_drafts)
        yield counter("pdserve:spec_decode_num_guess_hits", "Of them, rounds whose guess was the token.",
                      sd.num_guess_hits)
        if sd.acceptance_rate is not None:
            yield gauge("pdserve:spec_decode_acceptance_rate", "Accepted / verified draft tokens, since start.",
                        sd.acceptance_rate)
            yield gauge("pdserve:spec_decode_mean_accepted_length",
                        "Tokens per verify round (1 + accepted drafts), since start.", sd.mean_accepted_length)


class _HistogramFamily:
    """A histogram fed at scrape time from observations collected elsewhere (no lock shared with
    the thread that made them: it hands over a list)."""

    def __init__(self, name: str, doc: str, buckets, model_name: str):
        self.name, self.doc, self.model_name = name, doc, model_name
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0

    def observe(self, values: list[float]) -> None:
        for v in values:
            self.total += v
            i = next((k for k, b in enumerate(self.buckets) if v <= b), len(self.buckets))
            self.counts[i] += 1

    def family(self):
        h = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        h.add_metric([self.model_name], buckets, self.total)
        return h
