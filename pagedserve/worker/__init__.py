"""Workers: executors, the model runner, the KV pool, the sampler and model code."""
