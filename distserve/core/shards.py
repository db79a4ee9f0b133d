"""Which part of a model's KV each worker of a parallel instance holds: the (layer, head)
ranges that re-sharding maps between two (tp, pp) shapes. Pure: the runtime cuts and
joins tensors by these ranges, and the simulator can size transfers with them."""

from __future__ import annotations

from dataclasses import dataclass


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The layers of pipeline stage `pp_rank`: contiguous, the first stages one more."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


@dataclass(frozen=True)
class KVPart:
    """The KV a worker holds: these layers, these KV heads."""

    layers: range
    heads: range


def kv_parts(num_layers: int, num_kv_heads: int, tp: int, pp: int) -> list[list[KVPart]]:
    """`parts[s][t]`: the part of stage s, tensor rank t (heads split evenly by tp)."""
    if num_kv_heads % tp:
        raise ValueError(f"{num_kv_heads} KV heads do not divide by tp={tp}")
    n = num_kv_heads // tp
    return [
        [KVPart(stage_layers(num_layers, s, pp), range(t * n, (t + 1) * n)) for t in range(tp)]
        for s in range(pp)
    ]
