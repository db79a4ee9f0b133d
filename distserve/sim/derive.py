"""Profiles for a (model, tp) that was never measured, derived from a measured one with the
DistServe paper's analytic latency model (its Appendix A).

The paper writes a prefill batch's time as C1 (4 t h^2 + 2 t h m) + C2 (3 h t2 / b) + C3
(t tokens, t2 the sum of squared prompt lengths, h hidden size, m FFN size, per layer), and
a decode step's as memory-bound: weights read once plus the KV of every context token. Each
fitted coefficient therefore scales with one per-device quantity:

- prefill b (per token: the projections' FLOPs) and decode a and c (weights read per step,
  FLOPs per sequence): layers * (4 h^2 + 2 h m) / tp;
- prefill c (attention's t^2 term) and decode b (KV bytes per context token): layers * h / tp;
- prefill a (fixed per-batch cost: kernel launches per layer): layers.

Derived profiles say so in their `source`, and are estimates: the paper's own simulator has
no OPT-175B coefficients at all.
"""

from __future__ import annotations

import dataclasses

from distserve.model.config import ModelConfig
from distserve.sim.profile import Profile


def _weights(cfg: ModelConfig) -> float:
    h, m = cfg.hidden_size, cfg.intermediate_size
    return float(cfg.num_layers * (4 * h * h + 2 * h * m))


def derive_profile(
    base: Profile,
    base_cfg: ModelConfig,
    target_cfg: ModelConfig,
    tp: int,
    kv_capacity_tokens: int | None = None,
) -> Profile:
    """The profile of `target_cfg` at tensor degree `tp`, scaled from `base` (a measured
    profile of `base_cfg` at `base.tp`) on the same hardware."""
    if tp < 1 or target_cfg.num_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide {target_cfg.name}'s {target_cfg.num_heads} heads"
        )
    lin = (_weights(target_cfg) / tp) / (_weights(base_cfg) / base.tp)
    att = (target_cfg.num_layers * target_cfg.hidden_size / tp) / (
        base_cfg.num_layers * base_cfg.hidden_size / base.tp
    )
    layers = target_cfg.num_layers / base_cfg.num_layers
    pa, pb, pc = base.prefill

    def decode(t: tuple[float, float, float]) -> tuple[float, float, float]:
        return (t[0] * lin, t[1] * att, t[2] * lin)

    return dataclasses.replace(
        base,
        model=target_cfg.name,
        tp=tp,
        pp=1,
        prefill=(pa * layers, pb * lin, pc * att),
        decode_small=decode(base.decode_small),
        decode_large=decode(base.decode_large),
        kv_capacity_tokens=kv_capacity_tokens,
        source=f"derived (DistServe Appendix A scaling) from {base.model} tp{base.tp}: "
        f"{base.source}",
        fit={},
    )


def derive_all(
    profiles: list[Profile],
    model: str,
    capacity: dict[tuple[str, int, int], int] | None = None,
    max_tp: int = 8,
) -> list[Profile]:
    """Profiles of `model` at every tp up to max_tp that divides its heads, each derived
    from the measured profile of the largest other model with the nearest tp."""
    from distserve.model.registry import ARCHITECTURES

    target = ARCHITECTURES.get(model)
    if target is None:
        raise ValueError(f"cannot derive a profile for {model!r}: its architecture is unknown")
    bases = [p for p in profiles if p.model in ARCHITECTURES and p.model != model]
    if not bases:
        raise ValueError(f"cannot derive a profile for {model!r}: no measured profile to scale")
    largest = max(_weights(ARCHITECTURES[p.model]) for p in bases)
    bases = [p for p in bases if _weights(ARCHITECTURES[p.model]) == largest]
    out = []
    for tp in range(1, max_tp + 1):
        if target.num_heads % tp:
            continue
        base = min(bases, key=lambda p: (abs(p.tp - tp), p.tp))
        cap = (capacity or {}).get((model, tp, 1))
        out.append(derive_profile(base, ARCHITECTURES[base.model], target, tp, cap))
    return out
