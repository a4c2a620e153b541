"""Test helpers for pagedserve: tiny random-weight Hugging Face models."""

from pagedserve.testing.random_model import build_random_model, cached_random_model

__all__ = ["build_random_model", "cached_random_model"]
