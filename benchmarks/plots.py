"""PNG plots beside the benchmark tables (matplotlib, from the ``bench`` extra).

Plots are optional: without matplotlib a benchmark still writes its table and says that the
plot was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Curves = Mapping[tuple[str, str], Mapping[str, list[list[float]]]]
SKIPPED = "plot skipped: matplotlib is not installed (pip install '.[bench]')"
_STYLE = {"plain": ("#888888", "without BN"), "inserted": ("#1f6fb4", "bnfold.insert_bn")}


def training_curves(curves: Curves, path: Path) -> str:
    """Loss per step, mean over seeds, with and without inserted BN: one panel per (model,
    learning rate), log scale. Returns a line saying where the PNG went, or why not."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    models = list(dict.fromkeys(model for model, _ in curves))
    lrs = list(dict.fromkeys(lr for _, lr in curves))
    fig, axes = plt.subplots(len(models), len(lrs), figsize=(4 * len(lrs), 2.8 * len(models)),
                             squeeze=False, sharex=True)
    for (model, lr), runs in curves.items():
        ax = axes[models.index(model)][lrs.index(lr)]
        for variant, (colour, label) in _STYLE.items():
            mean = _mean_curve(runs.get(variant, []))
            if mean:
                ax.plot(range(1, len(mean) + 1), mean, color=colour, label=label, lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{model}, lr {lr}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("train loss")
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, path)


def _mean_curve(runs: list[list[float]]) -> list[float]:
    """Mean over the runs still going at each step (a diverged run stops early)."""
    out = []
    for step in range(max((len(r) for r in runs), default=0)):
        values = [r[step] for r in runs if step < len(r) and math.isfinite(r[step])]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def fold_time_vs_size(times: Mapping[str, Mapping[int, float]], path: Path) -> str:
    """Fold time against graph size (nodes) per tool, log-log, each time divided by bnfold's
    at the smallest size (ratios, not seconds), with a linear-scaling guide."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    sizes = sorted(times["bnfold"])
    unit = times["bnfold"][sizes[0]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for tool, by_size in times.items():
        xs = sorted(by_size)
        ax.plot(xs, [by_size[n] / unit for n in xs], marker="o", label=tool,
                lw=2.2 if tool == "bnfold" else 1.2)
    ax.plot(sizes, [n / sizes[0] for n in sizes], ls=":", color="#999", label="linear")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("graph size (nodes)")
    ax.set_ylabel(f"fold time / bnfold's at {sizes[0]} nodes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def latency_bars(ms: Mapping[str, Sequence[float]], variants: Sequence[str], path: Path,
                 title: str) -> str:
    """Grouped bars: one group per model, one bar per variant, each the latency in ms
    labelled with its ratio to the last variant (the reference form)."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(ms))]
        ys = [times[i] for times in ms.values()]
        bars = ax.bar(xs, ys, width, label=variant)
        ax.bar_label(bars, [f"{t[i] / t[-1]:.2f}x" for t in ms.values()], fontsize=7)
    ax.set_xticks(range(len(ms)), list(ms))
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> str:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"
