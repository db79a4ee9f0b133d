"""What runs inside a worker's process: the `Worker` (an instance's executor side, a Ray
actor or an in-process object) with its model runner, paged KV cache tensors, sampler,
torch.distributed endpoint for KV transfers, kernel choice and core pinning. Nothing
here holds request state or imports the controller-side modules of `runtime/`."""
