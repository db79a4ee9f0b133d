"""Layer-wise KV transfer: send a prefill's KV layer by layer as each layer finishes, so the
transfer of layer i overlaps the compute of layers i+1..L (the seeds' layer-wise overlap).

The model calls `LayerwiseSender.layer_done(i)` after layer i (`ModelRunner.on_layer` ->
`CausalLM.forward(on_layer=...)`); a background thread gathers layer i's rows of the
request's blocks and hands them to `send(i, tensor)` (a gloo isend, an object-store put, a
store write): torch ops release the GIL, so the thread runs while the forward goes on.
The receiving side writes each layer with `write_layer`.

A layer's rows in the cache's block view [layers*2*kv_heads, blocks, block_size*head_dim]
are the slice [i*2*kv_heads, (i+1)*2*kv_heads): one index_select per layer.

Wired into: benchmarks/layerwise_transfer.py (two processes over gloo). Not wired into
serving: the controller's migration still moves a request's KV after its prefill step.
The KV store's writes go layer by layer in serving, but not through this sender: the model
runner copies each finished layer's rows of a step's `store_writes` inline in its
`on_layer` hook (`ModelRunner._store_layers`, `layer_rows` slices; a sender thread measured
no better on one core: benchmarks/kv_store.py --layerwise), chained before `on_layer`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from distserve.runtime.worker.kv_cache import KVCache

_END = -1


def layer_rows(cache: KVCache) -> int:
    """Rows of the block view one layer holds (2 * kv_heads)."""
    return cache.blocks.shape[0] // len(cache.layers)


def read_layer(cache: KVCache, layer: int, blocks: torch.Tensor) -> torch.Tensor:
    """A contiguous copy [2*kv_heads, n, block_size*head_dim] of one layer of some blocks."""
    r = layer_rows(cache)
    return cache.blocks[layer * r : (layer + 1) * r].index_select(1, blocks)


def write_layer(cache: KVCache, layer: int, blocks: torch.Tensor, data: torch.Tensor) -> None:
    """Store one layer of some blocks, as `read_layer` gave them (maybe another cache's)."""
    r = layer_rows(cache)
    cache.blocks[layer * r : (layer + 1) * r].index_copy_(1, blocks, data.to(cache.dtype))


class LayerwiseSender:
    """Sends one step's KV of `blocks` layer by layer from a background thread.

    Per step: `begin(blocks)`, then the forward calls `layer_done(i)` for every layer in
    order, then `end()` waits until every layer was handed to `send` and re-raises the
    first error. Between `begin` and `end` nobody may write the blocks (the prefill's own
    later layers write other layers' rows only)."""

    def __init__(self, cache: KVCache, send: Callable[[int, torch.Tensor], None]) -> None:
        self.cache, self.send = cache, send
        self._jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._ended = threading.Event()
        self._blocks: torch.Tensor | None = None
        self._error: BaseException | None = None
        self.num_bytes = 0
        """Bytes handed to `send` in the current (or last) step."""
        self._thread = threading.Thread(target=self._run, name="kv-layerwise", daemon=True)
        self._thread.start()

    def begin(self, blocks: list[int]) -> None:
        if self._blocks is not None:
            raise RuntimeError("begin() before the previous step's end()")
        self._blocks = torch.tensor(blocks, dtype=torch.long, device=self.cache.data.device)
        self._error, self.num_bytes = None, 0
        self._ended.clear()

    def layer_done(self, layer: int) -> None:
        """Layer `layer` has written its KV: queue it (returns at once)."""
        if self._blocks is not None:
            self._jobs.put(layer)

    def end(self, timeout: float | None = None) -> int:
        """Wait until every queued layer was sent; returns the bytes sent."""
        if self._blocks is None:
            raise RuntimeError("end() without begin()")
        self._jobs.put(_END)
        finished = self._ended.wait(timeout)
        self._blocks = None
        if not finished:
            raise TimeoutError(f"layer-wise send not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.num_bytes

    def _run(self) -> None:
        while True:
            layer = self._jobs.get()
            if layer == _END:
                self._ended.set()
                continue
            if self._error is not None or self._blocks is None:
                continue
            try:
                data = read_layer(self.cache, layer, self._blocks)
                if data.device.type == "cuda":  # the layer's kernels ran on the main stream
                    torch.cuda.current_stream(data.device).synchronize()
                self.send(layer, data)
                self.num_bytes += data.numel() * data.element_size()
            except BaseException as e:  # noqa: BLE001  # re-raised by end()
                self._error = e
