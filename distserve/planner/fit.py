"""Fitting the paper's latency formulas to measured times, by least squares on relative
error (each sample weighted by 1/time), with coefficients kept non-negative."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Triple = tuple[float, float, float]


def fit_nonneg(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """argmin_b sum(((features @ b) - t) / t)^2 subject to b >= 0 (active-set: drop the
    most negative coefficient and refit until none is negative)."""
    w = 1.0 / times
    a, y = features * w[:, None], np.ones_like(times)
    active = list(range(features.shape[1]))
    while True:
        coef = np.zeros(features.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
            coef[active] = sol
        if (coef >= 0).all():
            return coef
        active.remove(int(np.argmin(coef)))


def rel_errors(pred: np.ndarray, times: np.ndarray) -> np.ndarray:
    errors: np.ndarray = np.abs(pred - times) / times
    return errors


def fit_prefill(
    batches: Sequence[Sequence[int]], times: Sequence[float]
) -> tuple[Triple, np.ndarray]:
    """(a, b, c) of a + b*sum(l) + c*sum(l^2) and each sample's relative error."""
    x = np.array([[1.0, float(sum(b)), float(sum(n * n for n in b))] for b in batches])
    t = np.asarray(times, dtype=float)
    coef = fit_nonneg(x, t)
    return (float(coef[0]), float(coef[1]), float(coef[2])), rel_errors(x @ coef, t)


def fit_decode(
    batches: Sequence[Sequence[int]], times: Sequence[float], threshold: int | None = None
) -> tuple[Triple, Triple, int, np.ndarray]:
    """(small triple, large triple, threshold, relative errors) of
    a + b*sum(context + 1) + c*batch, the threshold chosen among the measured batch sizes
    to minimise the total squared relative error, or `threshold` where it is known (the
    batch at which the runner leaves its packed kernels) and leaves 3 samples a side."""
    x = np.array([[1.0, float(sum(n + 1 for n in b)), float(len(b))] for b in batches])
    t = np.asarray(times, dtype=float)
    sizes = np.array([len(b) for b in batches])
    best: tuple[float, Triple, Triple, int, np.ndarray] | None = None
    candidates = sorted(set(sizes.tolist()))
    thresholds = [*candidates[1:], candidates[-1] + 1]
    if threshold is not None and min((sizes < threshold).sum(), (sizes >= threshold).sum()) >= 3:
        thresholds = [threshold]
    for thr in thresholds:
        small, large = sizes < thr, sizes >= thr
        if small.sum() < 3 or (large.any() and large.sum() < 3):
            continue
        cs = fit_nonneg(x[small], t[small])
        cl = fit_nonneg(x[large], t[large]) if large.any() else cs
        pred = np.where(small, x @ cs, x @ cl)
        err = rel_errors(pred, t)
        score = float((err**2).sum())
        if best is None or score < best[0]:
            best = (score, tuple(map(float, cs)), tuple(map(float, cl)), int(thr), err)  # type: ignore[assignment]
    if best is None:
        raise ValueError("too few decode samples to fit (need 3 per batch-size range)")
    return best[1], best[2], best[3], best[4]


def error_summary(err: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(err)),
        "p90": float(np.percentile(err, 90)),
        "max": float(err.max()),
        "samples": int(err.size),
    }
