"""GPU time of a call, by CUDA events: what start-up choices (choose_gemv) and benchmarks measure."""

from __future__ import annotations

import torch


def event_ms(fn, reps: int) -> float:
    """Milliseconds of GPU time per call of `fn` (warmed up already; e.g. a CUDA graph's replay):
    events recorded around `reps` calls in a row, then one synchronize."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_us(fn, reps: int, replays: int = 5) -> float:
    """Microseconds per call of `fn`: `reps` calls captured once into a CUDA graph (launch costs do
    not count), the graph replayed once, then `replays` times timed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    return 1000 * event_ms(graph.replay, replays) / reps
