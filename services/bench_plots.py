"""PNG plots of benchmark results, from plain dicts and lists (no engine import; matplotlib only).

    latency_cdf({"end to end": [s, ...], "TTFT": [s, ...]}, "lat.png")      `bench latency`
    bars({"pdserve": 31.9, "HF transformers": 19.5}, "tput.png")            `bench throughput`
    sweep(rows, "serve.png", x="request_rate",                              a sweep of request
          ys={"TTFT p50 (ms)": "p50_ttft_ms", "TPOT p50 (ms)": "p50_tpot_ms"})  rates (bench serve)

Each function writes one PNG and returns its path. matplotlib is the optional `bench` extra:
without it `PlotUnavailable` says so, and the caller prints that line instead of a plot.
"""

from __future__ import annotations

import os


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("no plot: matplotlib is not installed (pip install -e \".[bench]\")") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(series: dict[str, list[float]], path: str, title: str = "latency CDF",
                unit: str = "s") -> str:
    """One empirical CDF line per named list of latencies (empty lists are left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in series.items():
        xs = sorted(values)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{name} (n={len(xs)})")
    ax.set_xlabel(f"latency ({unit})")
    ax.set_ylabel("fraction of runs <= x")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, plt, path)


def bars(values: dict[str, float], path: str, title: str = "throughput", ylabel: str = "output tokens/s") -> str:
    """One labelled bar per name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    names = list(values)
    heights = [values[n] for n in names]
    drawn = ax.bar(names, heights, color=["#3b75af", "#ef8636", "#529e3f", "#c53a32"][:len(names)])
    ax.bar_label(drawn, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def sweep(rows: list[dict], path: str, x: str, ys: dict[str, str], title: str = "") -> str:
    """One panel per metric: `ys` maps a panel label to a key of the rows, plotted against
    `rows[i][x]` (e.g. TTFT and TPOT percentiles vs request rate). Rows without a key are skipped;
    a row may carry "label" to draw several series (e.g. one per routing mode)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.8), squeeze=False)
    labels = list(dict.fromkeys(r.get("label", "") for r in rows))
    for ax, (panel, key) in zip(axes[0], ys.items()):
        for label in labels:
            points = sorted((r[x], r[key]) for r in rows if r.get("label", "") == label and key in r)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label or None)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if any(labels):
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)
