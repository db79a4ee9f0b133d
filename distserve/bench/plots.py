"""Plots in the DistServe paper's shapes (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distserve.metrics.results import RequestResult
from distserve.metrics.summary import PHASES, phase_breakdown


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attainment_vs_x(
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    path: str,
    target: float = 0.9,
    title: str = "",
) -> None:
    """One line per system: attainment (%) against rate or SLO scale (Figures 8 and 9)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=name)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def phase_cdf(results: Sequence[RequestResult], path: str, title: str = "") -> None:
    """CDF of each phase's duration across requests (the paper's latency breakdown)."""
    plt = _pyplot()
    phases = phase_breakdown([r for r in results if r.ok])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in PHASES:
        vals = sorted(phases.get(name, []))
        if vals:
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("CDF")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
