"""What `goodput` shows a user: the layout by name (from the server's /health), and a
plot with a title (dataset, SLOs), the layout in the legend, a star at the goodput."""

from __future__ import annotations

import pytest

from distserve.bench.client import layout_name
from distserve.cli.bench import plot_title


def health(*roles: str) -> dict[str, object]:
    return {
        "status": "ok",
        "instances": {f"i{k}": {"alive": True, "role": r} for k, r in enumerate(roles)},
    }


@pytest.mark.parametrize(
    "roles,name",
    [
        (("prefill", "decode"), "1P1D"),
        (("prefill", "prefill", "decode"), "2P1D"),
        (("colocated", "colocated"), "colocated x2"),
        (("prefill", "decode", "colocated"), "1P1D + colocated x1"),  # mid-flip
        ((), None),
    ],
)
def test_layout_is_named_from_health(roles: tuple[str, ...], name: str | None) -> None:
    assert layout_name(health(*roles)) == name


def test_a_health_body_without_instances_names_nothing() -> None:
    assert layout_name({"status": "ok"}) is None


def test_goodput_plot_has_title_layout_legend_and_goodput_marker() -> None:
    pytest.importorskip("matplotlib")
    from distserve.bench.plots import attainment_figure

    sweep = {
        "dataset": "code",
        "slo": {"ttft": 0.6, "tpot": 0.08},
        "target": 0.9,
        "layout": "1P1D",
        "goodput": 1.25,
        "points": [(0.5, 1.0), (1.0, 0.95), (1.5, 0.85), (2.0, 0.5)],
    }
    title = plot_title(sweep)
    assert title == "code: SLO TTFT 0.6 s, TPOT 0.08 s, 90% attainment"
    fig = attainment_figure({"1P1D": sweep["points"]}, "rate", 0.9, title, goodputs={"1P1D": 1.25})
    (ax,) = fig.axes
    assert ax.get_title() == title
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1P1D"]
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1
    assert list(stars[0].get_xdata()) == [1.25] and list(stars[0].get_ydata()) == [90.0]
    assert any("goodput 1.25" in t.get_text() for t in ax.texts)
    # every rate met the target: the goodput is at least the last rate, starred there
    fig = attainment_figure({"1P1D": sweep["points"][:2]}, "rate", 0.9, goodputs={"1P1D": 1.0})
    (star,) = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    assert list(star.get_xdata()) == [1.0] and list(star.get_ydata()) == [95.0]
    assert any("goodput >= 1" in t.get_text() for t in fig.axes[0].texts)
    # no goodput (no rate met the target): no star
    fig = attainment_figure({"1P1D": sweep["points"]}, "rate", 0.9, goodputs={"1P1D": 0.0})
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    import matplotlib.pyplot as plt

    plt.close("all")
