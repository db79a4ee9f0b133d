"""The per-request rule on a real deployment (serve --prefill-on-decode): the latency
models core/routing.py's `PrefillOnDecode` weighs a prompt's two ways with: the emulated
devices' own (serve --emulate), else the given profile's, on the default serving path.
A decode instance prefills a prompt the way it recomputes a preempted request (its
scheduler's waiting queue), the mechanism degraded mode relies on too; the request then
never migrates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from distserve.core.routing import PrefillOnDecode

if TYPE_CHECKING:
    from distserve.cluster.emulation import EmulatedCluster
    from distserve.config import PlacementConfig


@dataclass(frozen=True)
class DecodePrefillConfig:
    """serve --prefill-on-decode: the TPOT target that bounds the stall a decode instance
    may take, and the latency profile (None: the emulated devices')."""

    tpot_slo: float
    profile: str | None = None

    def __post_init__(self) -> None:
        if not self.tpot_slo > 0:
            raise ValueError(f"tpot_slo must be > 0, got {self.tpot_slo}")


def decode_prefill_rule(
    config: DecodePrefillConfig,
    model: str,
    placement: PlacementConfig,
    emulated: EmulatedCluster | None,
) -> PrefillOnDecode:
    """The rule with each role's latency model. ValueError if there is none to use."""
    if config.profile is None:
        if emulated is None:
            raise ValueError("prefill_on_decode needs a latency profile (or emulated devices)")
        lat = {r: d.latency for r, d in zip(placement.roles, emulated.devices, strict=True)}
        return PrefillOnDecode(lat["prefill"], lat["decode"], config.tpot_slo)
    from distserve.sim.latency import latency_model
    from distserve.sim.profile import load_profiles
    from distserve.sim.serving_path import ServingPath

    profiles = load_profiles(config.profile)
    mine = [p for p in profiles if p.model == model and p.tp == p.pp == 1]
    lm = latency_model((mine or profiles)[0], ServingPath())
    return PrefillOnDecode(lm, lm, config.tpot_slo)
