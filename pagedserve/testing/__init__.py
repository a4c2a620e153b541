"""Test helpers for pagedserve: tiny random-weight Hugging Face models, GGUF files,
and load generators. The random-model builder itself lives in the engine
(`model.random_init` uses it); it is re-exported here for tests and benchmarks."""

from pagedserve.model.random_model import build_random_model, cached_random_model

__all__ = ["build_random_model", "cached_random_model"]
