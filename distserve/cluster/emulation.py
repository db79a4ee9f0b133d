"""Emulated devices (`serve --emulate`): a placement's instances as emulated workers on
emulated nodes, with the profile's step times and KV capacity, so that everything above
the executor (controller, routing, migration, recovery, server, metrics) runs for real
at a GPU cluster's scale on a CPU.

The cost of a step comes from `sim/`'s latency model, built as the planner builds it for
the same shape (`planner.phases.staged` for pipeline stages, `InstanceConfig.kv_blocks`
for the KV capacity), so the emulation and the simulator charge a step the same time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.model.config import ModelConfig
from distserve.model.registry import ARCHITECTURES
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.emulated import EmulatedExecutor, Links
from distserve.runtime.worker.emulated import EmulatedDevice

if TYPE_CHECKING:
    from distserve.sim.latency import LatencyModel
    from distserve.sim.profile import Profile

WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem", "hand",
    "part", "place", "case", "week", "company", "system", "program", "question", "work",
    "number", "night", "point", "home", "water", "room", "mother", "area", "money",
)  # fmt: skip
"""What the emulated model says: common words, in an order the seed picks."""

Spot = tuple[int, tuple[int, ...]]
"""(node, devices on it) of one instance."""


class EmulatedCluster:
    """The emulated workers of one placement: what each one is (latency model, KV blocks,
    node and devices) and the model and tokenizer the controller serves with.

    Built once by the controller; raises ValueError for a model without an architecture
    or profile, a shape the profile has no capacity for, or a placement that does not fit
    the nodes."""

    def __init__(
        self, engine: EngineConfig, placement: PlacementConfig, emulation: EmulationConfig
    ) -> None:
        self.emulation = emulation
        self.model_config, self.tokenizer = emulated_model(engine.model, emulation.tokenizer)
        self.tokens = token_stream(self.tokenizer, emulation.seed)
        self.links = Links(emulation.intra_node_bandwidth, emulation.inter_node_bandwidth)
        profiles = model_profiles(emulation.profile, engine.model)
        block_size = engine.cache.block_size
        shapes = {
            role: role_latency(profiles, *placement.shape(role), block_size)
            for role in set(placement.roles)
        }
        self.devices = [
            EmulatedDevice(shapes[role][0], shapes[role][1], block_size, self.model_config,
                           self.tokens, node, devices)
            for role, (node, devices) in zip(
                placement.roles, layout(placement, emulation), strict=True
            )
        ]  # fmt: skip

    def executors(self) -> list[EmulatedExecutor]:
        """One fresh executor per instance, in `placement.roles` order."""
        return [EmulatedExecutor(d, self.links) for d in self.devices]


def emulated_model(model: str, tokenizer: str) -> tuple[ModelConfig, Tokenizer]:
    """The served model's architecture (a registered one: no weights are needed) and the
    tokenizer that measures its prompts: another model's (default SmolLM2's, a byte-level
    BPE like OPT's own, so prompts get about the lengths the paper's had, and the lengths
    the planner's workloads are measured in), or 'bytes' (one token per UTF-8 byte:
    prompts ~4x longer)."""
    from distserve.model.metadata import load_tokenizer
    from distserve.model.registry import resolve

    if model not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"emulating needs a registered architecture, not {model!r}: {known}")
    config = ARCHITECTURES[model]
    if tokenizer == "bytes":
        return config, Tokenizer.bytes_only(config.vocab_size, config.eos_token_id)
    tok = load_tokenizer(resolve(tokenizer))[1]
    if tok.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer of {tokenizer} has {tok.vocab_size} tokens, more than {model}'s "
            f"{config.vocab_size}: its token ids would not fit the emulated model"
        )
    return config, tok


def token_stream(tokenizer: Tokenizer, seed: int, num_words: int = 256) -> tuple[int, ...]:
    """The fixed stream the emulated model samples from: seeded words, tokenized, with no
    special token in it, so no request ends by EOS unless it asks for EOS's id."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(num_words))
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    return tuple(t for t in tokenizer.encode(text, add_special_tokens=False) if t not in special)


def model_profiles(source: str, model: str) -> list[Profile]:
    """The profiles of `model` in `source` (a bundled name or a file); derived from the
    largest profiled model by the paper's scaling when it has none (as `plan` does)."""
    from distserve.sim.derive import derive_all
    from distserve.sim.profile import a100_kv_capacity, load_profiles

    try:
        profiles = load_profiles(source)
    except OSError as e:
        raise ValueError(f"cannot read the profiles {source!r}: {e}") from None
    mine = [p for p in profiles if p.model == model]
    return mine or derive_all(profiles, model, a100_kv_capacity())


def role_latency(
    profiles: Sequence[Profile], tp: int, pp: int, block_size: int
) -> tuple[LatencyModel, int]:
    """Latency model and KV blocks of one (virtual) instance of shape (tp, pp), as the
    planner's simulations build them: a pipeline of pp stages runs as pp virtual
    instances, each a full pass plus the stages' overhead, each with 1/pp of the KV."""
    from distserve.planner.phases import InstanceConfig, staged
    from distserve.sim.latency import latency_model
    from distserve.sim.profile import a100_kv_capacity, find
    from distserve.sim.serving_path import ServingPath

    try:
        profile = find(profiles, profiles[0].model, tp)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    blocks = InstanceConfig(profile, pp).kv_blocks(block_size, a100_kv_capacity())
    if not blocks:
        raise ValueError(
            f"{profile.model} at tp={tp}, pp={pp} has no KV capacity in the profile "
            "(it does not fit the devices, or the profile does not say)"
        )
    return latency_model(staged(profile, pp), ServingPath()), blocks


def layout(placement: PlacementConfig, emulation: EmulationConfig) -> list[Spot]:
    """Node and devices of each instance, in `placement.roles` order (the pp virtual
    instances of a pipeline share theirs). Instances are placed first-fit on the nodes,
    prefill and decode instances interleaved by their shares, so that a node holds both
    and most migrations stay on it; an instance never spans nodes."""
    if placement.mode == "colocated":
        counts = {"colocated": placement.num_instances}
    else:
        counts = {"prefill": placement.num_prefill, "decode": placement.num_decode}
    groups = [(role, i) for role, n in counts.items() for i in range(n)]
    order = sorted(groups, key=lambda g: (g[1] + 0.5) / counts[g[0]])
    free = [list(range(emulation.devices_per_node)) for _ in range(emulation.num_nodes)]
    spots: dict[tuple[str, int], Spot] = {}
    for role, i in order:
        tp, pp = placement.shape(role)
        node = next((n for n, f in enumerate(free) if len(f) >= tp * pp), None)
        if node is None:
            need = sum(placement.shape(r)[0] * placement.shape(r)[1] for r, _ in groups)
            raise ValueError(
                f"the placement needs {need} devices ({role} instances of tp={tp} x pp={pp} "
                f"each on one node); {emulation.num_nodes} node(s) of "
                f"{emulation.devices_per_node} devices cannot hold it"
            )
        spots[role, i] = (node, tuple(free[node][: tp * pp]))
        del free[node][: tp * pp]
    return [spots[g] for g in groups for _ in range(placement.shape(g[0])[1])]
