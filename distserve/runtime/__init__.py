"""One instance: the KV cache tensors, the model runner, the sampler and the step loop."""
