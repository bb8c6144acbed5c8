"""Prometheus metrics of the OpenAI front end, with vLLM's names and labels (torch-free).

Two sources:
  * engine state (running / waiting requests, KV usage, prefix-cache counters) is read at scrape
    time from a `stats()` callable the deployment supplies (`pdserve serve`: the engine core's
    `stats()`), so nothing is polled between scrapes;
  * request-level metrics (token counters, TTFT, inter-token latency, end-to-end latency, request
    sizes, finish reasons) are observed by the app as outputs reach it, one `RequestTracker` per
    engine request, O(1) work per output.

Each `ServerMetrics` owns its registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.common.outputs import RequestOutput

log = logging.getLogger("pdserve.metrics")

FINISH_REASONS = ("stop", "length", "abort", "error")
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
    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], dict] | None = None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels, name = self.registry, ["model_name"], model_name
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=r).labels(name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels,
                                         registry=r).labels(name)
        success = Counter("vllm:request_success", "Finished requests (one per choice), by finish reason.",
                          labels + ["finished_reason"], registry=r)
        self.request_success = {reason: success.labels(name, reason) for reason in FINISH_REASONS}
        self._success = success
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", labels,
                              buckets=LATENCY_BUCKETS, registry=r).labels(name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             labels, buckets=E2E_BUCKETS, registry=r).labels(name)
        sizes = token_buckets(max_model_len or 8192)  # a fleet's length may be unknown at start-up
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               labels, buckets=sizes, registry=r).labels(name)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request (per choice).", labels,
                                                   buckets=sizes, registry=r).labels(name)
        if stats is not None:
            r.register(_EngineStatsCollector(stats, name))

    def finished(self, reason: str | None) -> None:
        child = self.request_success.get(reason or "stop")
        if child is None:
            child = self.request_success[reason] = self._success.labels(self.model_name, reason)
        child.inc()

    def track(self, arrival_time: float | None = None) -> "RequestTracker":
        return RequestTracker(self, arrival_time or time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)


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

    def observe(self, out: RequestOutput, now: float) -> None:
        m = self.m
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
                if self.num_tokens[i] == 0:
                    if i == 0:
                        m.ttft.observe(_ttft(out, now, self.arrival_time))
                else:
                    m.itl.observe((now - self.last_token_time[i]) / num_new)
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
        for i, finished in enumerate(self.finished):
            if not finished:
                self.m.finished(reason)
                self.m.request_generation_tokens.observe(self.num_tokens[i])


def _ttft(out: RequestOutput, now: float, arrival_time: float) -> float:
    metrics = out.metrics
    if metrics is not None and metrics.first_token_time is not None and metrics.arrival_time:
        return max(metrics.first_token_time - metrics.arrival_time, 0.0)
    return now - arrival_time


class _EngineStatsCollector:
    """Engine state read at scrape time; a failing `stats()` leaves these series out of that scrape."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        try:
            s = self.stats()
        except Exception:
            log.exception("stats() failed")
            return
        labels = [self.model_name]

        def gauge(name: str, doc: str, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        def counter(name: str, doc: str, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, float(value))
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        kv = s.get("kv_usage", 0.0)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", kv)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (older name); 1 means 100 percent.", kv)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.get("prefix_queries", 0))
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_hits", 0))
        if "redis_up" in s:  # the disaggregated router: 0 while it routes on load alone
            yield gauge("pdserve:redis_up", "1 while the router reaches Redis, 0 while it routes on load alone.",
                        s["redis_up"])
        for key, name, doc in (("kv_bytes", "pdserve:kv_transfer_bytes", "KV bytes pulled by decode for this router's requests."),
                               ("handoffs", "pdserve:kv_handoffs", "Requests whose prompt KV was pulled from a prefill."),
                               ("decode_resubmits", "pdserve:decode_resubmits", "Requests moved to another decode after a failure."),
                               ("prefill_retries", "pdserve:prefill_retries", "Prefill calls retried on another instance.")):
            if key in s:
                yield counter(name, doc, s[key])
        if "routes" in s:  # the disaggregated router's decisions, by the reason routing.py gives
            routes = CounterMetricFamily("pdserve:routing_decisions", "Routing decisions by reason.",
                                         labels=["model_name", "reason"])
            for reason, count in sorted(s["routes"].items()):
                routes.add_metric([self.model_name, reason], float(count))
            yield routes
        if "num_preemptions" in s:
            yield counter("vllm:num_preemptions", "Preemptions (recompute) so far.", s["num_preemptions"])
