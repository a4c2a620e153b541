"""Model building blocks: norms, rotary embeddings, paged attention."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors created without a dtype inside get `dtype` (parameters, while a model is built)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
