"""Tensor and pipeline parallelism inside one instance: which part of a model a worker
holds, and how it talks to the workers that hold the rest.

Tensor parallelism (Megatron-style) over a group of k ranks:

- attention: each rank holds heads/k query heads and kv_heads/k KV heads (its slice of
  the fused q/k/v rows, column-parallel) and the matching columns of the output
  projection (row-parallel); the partial outputs are summed by one all-reduce. The KV
  cache of a rank holds its KV heads only.
- MLP: the up (and gate) rows are split, the down projection's columns; one all-reduce.
- embedding and LM head: split by vocabulary; a token's embedding comes from the rank
  that holds its row (all-reduce), the logits of every slice are gathered.
- biases of row-parallel projections, and the residual, are added on rank 0 only.

Pipeline parallelism: stage s of p holds a contiguous run of layers (the first stages one
more when p does not divide the layer count); the first stage embeds, the last
normalizes and holds the head.

Every rank loads the whole checkpoint and keeps its part (simple; a model that does not
fit one worker's memory would need a loader that reads only its part).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distserve.core.shards import stage_layers
from distserve.model.base import CausalLM
from distserve.model.config import ModelConfig

PARALLEL_ARCHS = ("llama", "opt")


@dataclass(frozen=True)
class Shard:
    """Where one worker sits in its instance: tensor rank of tp, pipeline stage of pp."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"bad shard {self}")

    @property
    def parallel(self) -> bool:
        return self.tp_size > 1 or self.pp_size > 1

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def check_parallel(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise ValueError, naming the model's sizes, if it cannot be split this way."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if tp == pp == 1:
        return
    name = cfg.name or cfg.arch
    if cfg.arch not in PARALLEL_ARCHS:
        raise ValueError(
            f"{name}: tensor/pipeline parallelism supports the {', '.join(PARALLEL_ARCHS)} "
            f"families, not {cfg.arch}"
        )
    if cfg.num_heads % tp or cfg.num_kv_heads % tp:
        raise ValueError(
            f"{name} has {cfg.num_heads} attention heads and {cfg.num_kv_heads} KV heads: "
            f"tp={tp} must divide both"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(f"{name}: MLP width {cfg.intermediate_size} does not divide by tp={tp}")
    if pp > cfg.num_layers:
        raise ValueError(f"{name} has {cfg.num_layers} layers: too few for pp={pp} stages")


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """The shape of one worker's part, as its KV cache sees it: its heads, its layers."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // shard.tp_size,
        num_kv_heads=cfg.num_kv_heads // shard.tp_size,
        head_dim=cfg.head_dim,
        num_layers=len(stage_layers(cfg.num_layers, shard.pp_rank, shard.pp_size)),
    )


class TensorGroup:
    """The process group of an instance's tensor-parallel ranks (gloo on CPU, NCCL on
    CUDA). Standalone, not torch.distributed's default group: a worker's default group is
    the KV migration group (runtime/worker/p2p.py)."""

    def __init__(
        self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float
    ) -> None:
        self.rank, self.size = rank, size
        delta = datetime.timedelta(seconds=timeout)
        if device.type == "cuda":
            self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(store, rank, size)  # type: ignore[attr-defined]
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, size, delta)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        self.pg.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, m] on every rank -> [N, size*m], rank order along the last dimension."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=-1)


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's input columns, then the sum over ranks.
    The residual (and the bias: zero on other ranks) enters on rank 0 only."""

    def __init__(self, inner: nn.Linear, group: TensorGroup) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None and self.group.rank == 0:
            out = self.inner(x, residual)
        else:
            out = self.inner(x)
        return self.group.all_reduce(out)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other tokens contribute zeros here and
    their row on the rank that holds it."""

    def __init__(self, weight: torch.Tensor, start: int, group: TensorGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.group.all_reduce(out)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


def _column_slice(lin: nn.Linear, sizes: list[int], rank: int, k: int) -> None:
    """Keep this rank's k-th of every group of output rows (q|k|v, gate|up)."""
    pieces_w, pieces_b, start = [], [], 0
    for size in sizes:
        n = size // k
        lo = start + rank * n
        pieces_w.append(lin.weight[lo : lo + n])
        if lin.bias is not None:
            pieces_b.append(lin.bias[lo : lo + n])
        start += size
    lin.weight = _param(torch.cat(pieces_w))
    if lin.bias is not None:
        lin.bias = _param(torch.cat(pieces_b))
    lin.out_features = lin.weight.shape[0]


def _row_parallel(lin: nn.Linear, group: TensorGroup) -> RowParallel:
    n = lin.in_features // group.size
    lin.weight = _param(lin.weight[:, group.rank * n : (group.rank + 1) * n])
    lin.in_features = n
    if lin.bias is not None and group.rank != 0:
        lin.bias = _param(torch.zeros_like(lin.bias))
    return RowParallel(lin, group)


def _vocab_rows(w: torch.Tensor, group: TensorGroup) -> tuple[torch.Tensor, int]:
    """This rank's rows of a [vocab, e] matrix, padded with zero rows to ceil(vocab/k)."""
    n = -(-w.shape[0] // group.size)
    start = group.rank * n
    part = w[start : start + n]
    if part.shape[0] < n:
        part = torch.cat([part, part.new_zeros(n - part.shape[0], w.shape[1])])
    return part, start


def _split_tensor_parallel(model: CausalLM, group: TensorGroup) -> None:
    cfg, k, r = model.config, group.size, group.rank
    for layer in model.layers:
        attn = layer.self_attn
        if cfg.arch == "llama":
            _column_slice(attn.qkv_proj, list(attn.sizes), r, k)
            attn.sizes = [s // k for s in attn.sizes]
            attn.num_kv_heads //= k
            mlp = layer.mlp
            _column_slice(mlp.gate_up_proj, [cfg.intermediate_size] * 2, r, k)
            mlp.down_proj = _row_parallel(mlp.down_proj, group)
        else:  # opt
            _column_slice(attn.qkv_proj, [cfg.hidden_size] * 3, r, k)
            _column_slice(layer.fc1, [cfg.intermediate_size], r, k)
            layer.fc2 = _row_parallel(layer.fc2, group)
        attn.num_heads //= k
        attn.o_proj = _row_parallel(attn.o_proj, group)
    tied = model.lm_head is None
    rows, start = _vocab_rows(model.embed_tokens.weight, group)
    model.embed_tokens = VocabParallelEmbedding(rows.clone(), start, group)
    if not tied:
        head, _ = _vocab_rows(model.lm_head.weight, group)
        model.lm_head.weight = _param(head)
        model.lm_head.out_features = head.shape[0]
    model.tp = group


def split_model(model: CausalLM, shard: Shard, group: TensorGroup | None) -> CausalLM:
    """Cut a whole loaded model down to this worker's part, in place; `group` is its
    tensor-parallel group (None when tp is 1). Packs the kept weights again."""
    cfg = model.config
    check_parallel(cfg, shard.tp_size, shard.pp_size)
    if not shard.parallel:
        return model
    keep = stage_layers(cfg.num_layers, shard.pp_rank, shard.pp_size)
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.first_stage, model.last_stage = shard.pp_rank == 0, shard.last_stage
    if shard.tp_size > 1:
        if group is None or group.size != shard.tp_size:
            raise ValueError(f"tp={shard.tp_size} needs a tensor group of that size")
        _split_tensor_parallel(model, group)
    model.pack_weights()
    return model
