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
    goodputs: Mapping[str, float] | None = None,
) -> None:
    """One line per system: attainment (%) against rate or SLO scale (Figures 8 and 9).
    `goodputs` marks each system's goodput (where its line crosses the target) with a
    star in its colour, the value written beside it."""
    plt = _pyplot()
    fig = attainment_figure(series, xlabel, target, title, goodputs)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attainment_figure(  # type: ignore[no-untyped-def]
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    target: float = 0.9,
    title: str = "",
    goodputs: Mapping[str, float] | None = None,
):
    """The figure `attainment_vs_x` saves (matplotlib's Figure)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in series.items():
        pts = sorted(pts)
        (line,) = ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=name)
        g = (goodputs or {}).get(name, 0.0)
        if g > 0:
            # on the line: at the target where it crosses, at the last point where every
            # rate tried met the target (then the goodput is at least that)
            last = g >= pts[-1][0]
            y = 100 * (pts[-1][1] if last else target)
            ax.plot([g], [y], marker="*", markersize=14, color=line.get_color())
            ax.annotate(
                f"goodput {'>= ' if last else ''}{g:.3g}",
                (g, y),
                textcoords="offset points",
                xytext=(-10, -24) if last else (8, 6),
                ha="right" if last else "left",
                fontsize=8,
                color=line.get_color(),
            )
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


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
