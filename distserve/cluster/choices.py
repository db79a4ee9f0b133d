"""Several choices for one prompt (the API's `n`): one request per choice, all sharing the
prompt's KV through the prefix cache.

Choice 0 (the leader) is queued at once. Choices 1..n-1 wait here, holding no blocks,
until the leader's prompt has been computed: its full blocks are then named in the prefix
cache of the instance that prefilled it, and each waiting choice, queued on that same
instance, takes them (ref-counted, not copied) and computes only the prompt's last partial
block. Without prefix caching nothing could be shared, and the choices are queued at once.

Each choice samples with its own seed (`choice_seed`), so seeded choices differ from each
other and repeat across identical requests; greedy choices are all equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

from distserve.core import Request, SamplingParams

if TYPE_CHECKING:  # the server's request bodies import this module: keep it torch-free
    from distserve.cluster.request_table import RequestState

MAX_CHOICES = 8
"""Most choices one prompt may ask for (`n`)."""


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice `index` of a request seeded with `seed`: choice 0 keeps
    the request's own seed (so `n=1` samples as before); the others get a seed derived by
    hashing (seed, index), never a small offset (the sampler already mixes the output
    position into the seed linearly, and an offset could line two choices up)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits, as the sampler's seeds


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling parameters of choice `index`: the request's, with its own seed."""
    seed = choice_seed(params.seed, index)
    return params if seed == params.seed else dataclasses.replace(params, seed=seed)


def sibling(leader: Request, request_id: str, index: int) -> Request:
    """Choice `index` of the prompt whose choice 0 is `leader` (not yet started)."""
    return Request(
        request_id,
        list(leader.prompt_token_ids),
        choice_params(leader.sampling_params, index),
        leader.arrival_time,
        eos_token_id=leader.eos_token_id,
    )


@dataclasses.dataclass
class Held:
    """A choice waiting for its leader's prefill: its state (already streamable) and its
    request."""

    state: RequestState
    request: Request


class HeldChoices:
    """Choices waiting for their leader's prefill, by leader and by their own id.

    Ownership: the controller holds a choice here at submit, and takes it back (`release`)
    when its leader has produced its first token, failed or been aborted, or (`drop`) when
    the choice itself is aborted. A held choice is in no scheduler and holds no block."""

    def __init__(self) -> None:
        self._by_leader: dict[str, list[Held]] = {}
        self._leader_of: dict[str, str] = {}

    def hold(self, leader_id: str, held: Held) -> None:
        self._by_leader.setdefault(leader_id, []).append(held)
        self._leader_of[held.request.request_id] = leader_id

    def release(self, leader_id: str) -> list[Held]:
        """Every choice still waiting for `leader_id`, in choice order (none: empty)."""
        out = self._by_leader.pop(leader_id, [])
        for h in out:
            del self._leader_of[h.request.request_id]
        return out

    def drop(self, request_id: str) -> Held | None:
        """Take one waiting choice out (it was aborted); None if it is not waiting."""
        leader_id = self._leader_of.pop(request_id, None)
        if leader_id is None:
            return None
        group = self._by_leader[leader_id]
        held = next(h for h in group if h.request.request_id == request_id)
        group.remove(held)
        if not group:
            del self._by_leader[leader_id]
        return held

    def all(self) -> list[Held]:
        return [h for group in self._by_leader.values() for h in group]

    def clear(self) -> None:
        self._by_leader.clear()
        self._leader_of.clear()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leader_of

    def __len__(self) -> int:
        return len(self._leader_of)
