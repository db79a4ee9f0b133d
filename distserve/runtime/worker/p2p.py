"""KV migration over torch.distributed point-to-point (gloo on CPU, NCCL on GPU): the
worker's side. One `P2PEndpoint` per worker process, owned by its `Worker`.

The protocol, driven by the controller (`transport.transfer_blocks`); a Ray actor runs
one call at a time, so only the receiving side may block:

    prefill worker (rank s)                  decode worker (rank d)
    post_send(tag, blocks, d): gather,
      isend posted, returns at once   ---->  recv(shape, s, tag): blocking recv into
                                             a reused buffer; the caller scatters it
    finish_send(tag): wait() (complete
      by now), drop the gathered tensor

Ownership: from `post_send` until `finish_send` the endpoint owns the gathered tensor
(the backend reads it in the background); nobody else touches it. The controller calls
`finish_send` for every posted tag once the matching `recv` has returned, whether the
transfer succeeded or not, and makes sure every posted send is matched by a `recv` (into
the cache, or into the scratch buffer when the migration was abandoned), so no isend
stays posted. Tags are unique per sender; a tag is never reused within a group.

Failure: the group timeout bounds every blocking call. When gloo times out it closes the
pair of processes involved, so later transfers between those two fail and are rolled back
by the controller (the prefill side still holds the KV); restarting the workers is the
reliability layer's job. If a peer process dies, its pairs close and calls that involve it
fail at once rather than hang.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


class P2PEndpoint:
    """This process's membership in the KV process group, and its sends in flight."""

    def __init__(
        self,
        address: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Join the group whose TCPStore listens on address:port (the controller hosts
        it). Blocks until all `world_size` members have joined, or `timeout` seconds. The
        group is this process's default torch.distributed group, so a process belongs to
        at most one (tensor/pipeline groups would be made as subgroups of it)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        td = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=td)
        # NCCL: bind the device now, so the communicator exists before the first isend
        # (a lazily made one would block the isend until the peer posts its recv).
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=td,
            device_id=device if backend == "nccl" else None,
        )
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device, self.dtype = device, dtype
        self.pending: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        """Posted sends by tag: the work handle and the tensor it reads."""
        self._buffer = torch.empty(0, dtype=dtype, device=device)

    def post_send(self, tag: int, data: torch.Tensor, dst: int) -> int:
        """Post a non-blocking send of the contiguous tensor `data` to rank `dst`; keep
        it until `finish_send(tag)`. Returns the bytes posted."""
        if tag in self.pending:
            raise ValueError(f"tag {tag} is already in flight")
        if not data.is_contiguous():
            raise ValueError("a posted tensor must be contiguous")
        work = dist.isend(data, dst, tag=tag)
        assert work is not None
        self.pending[tag] = (work, data)
        return int(data.numel() * data.element_size())

    def recv(self, shape: tuple[int, ...], src: int, tag: int) -> torch.Tensor:
        """Block until the tensor that rank `src` posted under `tag` has arrived. Returns a
        view of a buffer this endpoint reuses: valid until the next `recv`."""
        numel = 1
        for n in shape:
            numel *= n
        if self._buffer.numel() < numel:  # grow once; re-faulting pages each time is costly
            self._buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
        out = self._buffer[:numel].view(shape)
        dist.recv(out, src, tag=tag)
        return out

    def finish_send(self, tag: int) -> bool:
        """Forget a posted send after its recv returned: wait for it (it is complete or
        failed by then) and drop the tensor. False if the send failed (logged)."""
        entry = self.pending.pop(tag, None)
        if entry is None:
            return False
        work, _ = entry
        try:
            work.wait()
            if self.device.type == "cuda":  # NCCL's wait orders streams; finish the copy
                torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError:
            log.warning("KV send with tag %d failed", tag, exc_info=True)
            return False
        return True

    def close(self) -> None:
        """Leave the group (best effort); sends still in flight are dropped."""
        self.pending.clear()
        if dist.is_initialized():
            dist.destroy_process_group()
