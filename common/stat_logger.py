"""Engine statistics in the log every few seconds, as vLLM's servers print them (torch-free).

    INFO pdserve.stats: Engine: Avg prompt throughput: 2437.1 tokens/s, Avg generation throughput:
         581.3 tokens/s, Running: 64 reqs, Waiting: 0 reqs, KV cache usage: 17.2%, Prefix cache
         hit rate: 0.0%[, Spec decode acceptance: 62.0%, mean accepted length: 2.86]

Throughputs, the hit rate and the acceptance are over the interval (the counters' deltas); the
request counts and the KV usage are as of its end. A quiet interval (no token, no request
running or waiting) prints nothing. On by default in `pdserve serve`, `prefill` and `decode` (their
engine; the router prints none: its engines do), every `--log-stats-interval` seconds (10, vLLM's VLLM_LOG_STATS_INTERVAL default);
`--disable-log-stats` (vLLM's flag) turns it off. A daemon thread reads `stats_fn()` (an
EngineStats), as /metrics does on a scrape.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Callable

from pdserve.common.stats import EngineStats

log = logging.getLogger("pdserve.stats")
log.setLevel(logging.INFO)  # the CLI's root level is WARNING; these lines are the point of the logger

STATS_INTERVAL_S = 10.0


def add_stat_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable-log-stats", action="store_true",
                   help="do not log engine statistics (throughput, running / waiting requests, KV usage)")
    p.add_argument("--log-stats-interval", type=float, default=STATS_INTERVAL_S,
                   help="seconds between statistics lines (default: %(default)s)")


def start_stat_logger(args: argparse.Namespace, stats_fn: Callable[[], EngineStats], label: str) -> "StatLogger | None":
    """The logger the flags ask for, started; None with --disable-log-stats."""
    if args.disable_log_stats:
        return None
    if args.log_stats_interval <= 0:
        from pdserve.common.config import ConfigError
        raise ConfigError(f"--log-stats-interval must be positive, got {args.log_stats_interval}")
    logger = StatLogger(stats_fn, label, args.log_stats_interval)
    logger.start()
    return logger


class StatLogger:
    def __init__(self, stats_fn: Callable[[], EngineStats], label: str, interval_s: float = STATS_INTERVAL_S):
        self.stats_fn, self.label, self.interval_s = stats_fn, label, interval_s
        self._last: EngineStats | None = None
        self._last_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self, stats: EngineStats, now: float) -> str | None:
        """The line for the interval ending with `stats` at `now` (None: a quiet interval, or the
        first call, which only takes the starting counters)."""
        last, last_at = self._last, self._last_at
        self._last, self._last_at = stats, now
        if last is None:
            return None
        seconds = max(now - last_at, 1e-9)
        prompt = stats.num_prompt_tokens - last.num_prompt_tokens
        generated = stats.num_generated_tokens - last.num_generated_tokens
        if not (prompt or generated or stats.num_running or stats.num_waiting):
            return None
        queries = stats.prefix_queries - last.prefix_queries
        hit_rate = 100.0 * (stats.prefix_hits - last.prefix_hits) / queries if queries > 0 else 0.0
        text = (f"{self.label}: Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
                f"Avg generation throughput: {generated / seconds:.1f} tokens/s, Running: {stats.num_running} reqs, "
                f"Waiting: {stats.num_waiting} reqs, KV cache usage: {100.0 * stats.kv_usage:.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%")
        spec, before = stats.spec_decode, last.spec_decode
        if spec is not None and before is not None:
            drafted = spec.num_draft_tokens - before.num_draft_tokens
            drafts = spec.num_drafts - before.num_drafts
            if drafted > 0 and drafts > 0:
                accepted = spec.num_accepted_tokens - before.num_accepted_tokens
                text += (f", Spec decode acceptance: {100.0 * accepted / drafted:.1f}%, "
                         f"mean accepted length: {1 + accepted / drafts:.2f}")
        return text

    def start(self) -> None:
        self.line(self.stats_fn(), time.monotonic())  # the starting counters
        self._thread = threading.Thread(target=self._run, name="pdserve-stat-logger", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = self.line(self.stats_fn(), time.monotonic())
            except Exception as e:  # a stats source gone (shutting down): say so once and stop
                log.warning("%s: statistics unavailable, no more lines: %s", self.label, e)
                return
            if text is not None:
                log.info(text)
