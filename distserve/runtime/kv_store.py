"""The KV store's bytes: a pool of host-memory slots, each the size of one KV block, that
outlives the workers.

The pool belongs to the controller's process (core/kv_store.py keeps its directory:
which slot holds which block of which request, by name). Workers map it: on CPU it is a
file under /dev/shm, named after the controller's pid so that the reaper removes it when
the server dies (cluster/reaper.py), and kept named while the server lives so that a
restarted worker maps it again. In-process workers use the tensor itself.

Layout: the block view of a KV cache (runtime/worker/kv_cache.py) with `num_slots` blocks,
[layers*2*kv_heads, num_slots, block_size*head_dim], so a slot and a cache block copy into
each other with one index_select / index_copy pair, whatever the model.

A Ray worker on another node than the controller's cannot map the file: `StoreRelay` is
the controller's side of its store traffic. The slots a step reads go to the worker with
the step, and the token offsets it writes come back with the result (`gather_writes`),
both as numpy arrays through Ray's object store, the transport migration uses across
nodes. Its writes land when the step ends, not layer by layer.

The disk tier (`SpillFile`, serve --kv-store-disk-gb) is one file of slots of the same
size, written and read by the controller's process only, and unlinked as soon as it is
open: the kernel frees it when that process ends, however it ends, so no reaper is needed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

import numpy as np
import torch

from distserve.model.config import ModelConfig
from distserve.runtime.worker.kv_cache import block_view, cache_shape, map_shared, num_blocks_for

SHM_DIR = "/dev/shm"

log = logging.getLogger(__name__)


class StorePool:
    """`num_slots` block-sized slots of host memory, allocated and touched once."""

    def __init__(
        self,
        cfg: ModelConfig,
        gib: float,
        block_size: int,
        dtype: torch.dtype,
        shared: bool,
    ) -> None:
        """`shared`: back it by a /dev/shm file other processes can map (Ray workers);
        else plain memory of this process (in-process workers)."""
        self.num_slots = num_blocks_for(cfg, gib, block_size, dtype)
        self.shape = cache_shape(cfg, self.num_slots, block_size)
        self.dtype = dtype
        self.path: str | None = None
        if shared and os.path.isdir(SHM_DIR):
            # the reaper removes distserve-kv-<pid>-* files of a dead server (reaper.py)
            name = f"distserve-kv-{os.getpid()}-store-{uuid.uuid4().hex[:12]}"
            self.path = os.path.join(SHM_DIR, name)
            data = map_shared(self.path, self.shape, dtype)
        else:
            data = torch.empty(self.shape, dtype=dtype)
        data.zero_()  # first-touch faults now, not in the middle of a request
        self.blocks = block_view(data)
        self.bytes_per_slot = self.blocks[:, 0].numel() * data.element_size()

    @property
    def num_bytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    def close(self) -> None:
        """Remove the file's name (workers that mapped it keep their mapping)."""
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)
        self.path = None


class SpillFile:
    """`num_slots` slots of a pool's slot size in one file on disk: the disk tier of the
    store's directory (core/kv_store.py `DiskTier`), which says what goes where."""

    def __init__(self, pool: StorePool, gib: float, directory: str | None = None) -> None:
        """`directory`: where the file goes (None: the system's temporary directory).
        Raises ValueError if it cannot be created there or `gib` holds no slot."""
        self.pool = pool
        self.slot_bytes = pool.bytes_per_slot
        self.num_slots = int(gib * 2**30 // self.slot_bytes)
        if self.num_slots < 1:
            raise ValueError(
                f"kv_store_disk_gb must hold one block ({self.slot_bytes} B), got {gib}"
            )
        directory = directory or tempfile.gettempdir()
        try:
            fd, path = tempfile.mkstemp(prefix=f"distserve-kv-{os.getpid()}-spill-", dir=directory)
        except OSError as e:
            raise ValueError(f"kv_store_disk_dir {directory!r} is not writable: {e}") from None
        os.unlink(path)  # freed with the last descriptor: no file outlives this process
        try:
            os.ftruncate(fd, self.num_bytes)  # sparse: disk used as written
        except OSError as e:
            os.close(fd)
            raise ValueError(
                f"kv_store_disk_gb {gib}: too large a file for {directory!r}: {e}"
            ) from None
        self.fd: int | None = fd
        self.num_failures = 0
        """Copies that failed (logged once: a full disk would fail every spill)."""
        # contiguous staging for one slot (a slot of the block view is strided by layer)
        self._buf = torch.empty(pool.blocks[:, 0].shape, dtype=pool.dtype)
        self._bytes = memoryview(self._buf.view(torch.uint8).numpy()).cast("B")

    @property
    def num_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def write(self, slot: int, disk_slot: int) -> bool:
        """Copy pool slot `slot` into disk slot `disk_slot`; False on an I/O error (disk
        full: the block is dropped, as an eviction without a disk tier)."""
        assert self.fd is not None
        self._buf.copy_(self.pool.blocks[:, slot])
        offset, done = disk_slot * self.slot_bytes, 0
        try:
            while done < self.slot_bytes:
                done += os.pwrite(self.fd, self._bytes[done:], offset + done)
        except OSError as e:
            self._failed(f"spilling a block failed ({e}): dropped")
            return False
        return True

    def read(self, disk_slot: int, slot: int) -> bool:
        """Copy disk slot `disk_slot` into pool slot `slot`; False on an I/O error."""
        assert self.fd is not None
        offset, done = disk_slot * self.slot_bytes, 0
        try:
            while done < self.slot_bytes:
                n = os.preadv(self.fd, [self._bytes[done:]], offset + done)
                if n == 0:
                    raise OSError("unexpected end of the spill file")
                done += n
        except OSError as e:
            self._failed(f"reading a spilled block failed ({e})")
            return False
        self.pool.blocks[:, slot].copy_(self._buf)
        return True

    def _failed(self, what: str) -> None:
        if not self.num_failures:
            log.warning("KV store disk tier: %s (further failures are not logged)", what)
        self.num_failures += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None


def write_to_store(
    cache_blocks: torch.Tensor, store: torch.Tensor, writes: tuple[tuple[int, int, int, int], ...],
    block_size: int, rows: slice = slice(None),
) -> int:  # fmt: skip
    """Copy token offsets [first, end) of cache blocks into the same offsets of store
    slots (both block views; `writes` as StepPlan.store_writes). Whole blocks go in one
    gather/scatter; partial ones (a decode step's one token) one strided copy each.
    `rows`: only these rows of the block views (one layer's, as the model runner writes
    a prefill's KV layer by layer). Returns bytes written."""
    if not writes:
        return 0
    cache_blocks, store = cache_blocks[rows], store[rows]
    width = cache_blocks.shape[2]
    bs, head_dim = block_size, width // block_size
    whole = [(b, s) for b, s, first, end in writes if first == 0 and end == bs]
    n = 0
    if whole:
        src = torch.tensor([b for b, _ in whole], dtype=torch.long, device=cache_blocks.device)
        dst = torch.tensor([s for _, s in whole], dtype=torch.long)
        store.index_copy_(1, dst, cache_blocks.index_select(1, src).to(store.device))
        n += len(whole) * width
    for b, s, first, end in writes:
        if first == 0 and end == bs:
            continue
        lo, hi = first * head_dim, end * head_dim
        store[:, s, lo:hi].copy_(cache_blocks[:, b, lo:hi])
        n += hi - lo
    return n * cache_blocks.shape[0] * cache_blocks.element_size()


def gather_writes(
    cache_blocks: torch.Tensor, writes: tuple[tuple[int, int, int, int], ...], block_size: int
) -> torch.Tensor:
    """The token offsets `write_to_store` would copy for `writes`, packed side by side
    [rows, tokens*head_dim] in their order: what a worker that cannot map the store
    sends it (`scatter_writes` unpacks them into the slots)."""
    head_dim = cache_blocks.shape[2] // block_size
    parts = [cache_blocks[:, b, first * head_dim : end * head_dim] for b, _, first, end in writes]
    return torch.cat(parts, dim=1)


def scatter_writes(
    store: torch.Tensor, writes: tuple[tuple[int, int, int, int], ...], data: torch.Tensor,
    block_size: int,
) -> int:  # fmt: skip
    """Copy what `gather_writes` packed into the store slots `writes` name; bytes written."""
    head_dim = store.shape[2] // block_size
    col = 0
    for _, slot, first, end in writes:
        width = (end - first) * head_dim
        store[:, slot, first * head_dim : end * head_dim].copy_(data[:, col : col + width])
        col += width
    if col != data.shape[1]:
        raise ValueError(f"{data.shape[1]} columns of KV for writes of {col}")
    return int(data.numel() * data.element_size())


def to_numpy(t: torch.Tensor) -> np.ndarray:  # type: ignore[type-arg]
    """A CPU copy as numpy (bf16 viewed as int16: numpy has no bf16, and numpy arrays move
    through Ray's object store ~10x faster than tensors)."""
    t = t.cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_numpy(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[type-arg]
    """`to_numpy`'s inverse (an object-store array is read-only: it is only read)."""
    t = torch.from_numpy(np.array(data, copy=not data.flags.writeable))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class StoreRelay:
    """The controller's side of the store for a worker on another node (it cannot map the
    pool's file): slots read out for its steps and pulls, and the KV its steps write,
    copied in. Called in a thread beside the event loop (torch copies release the GIL)."""

    def __init__(self, pool: StorePool) -> None:
        self.pool = pool
        self.num_bytes = 0
        """Bytes relayed both ways."""

    def read(self, slots: list[int]) -> np.ndarray:  # type: ignore[type-arg]
        idx = torch.tensor(slots, dtype=torch.long)
        data = to_numpy(self.pool.blocks.index_select(1, idx))
        self.num_bytes += data.nbytes
        return data

    def write(self, writes: tuple[tuple[int, int, int, int], ...], data: np.ndarray) -> int:  # type: ignore[type-arg]
        block_size = self.pool.shape[4]  # cache_shape: [..., slots, block_size, head_dim]
        n = scatter_writes(self.pool.blocks, writes, from_numpy(data, self.pool.dtype), block_size)
        self.num_bytes += n
        return n
