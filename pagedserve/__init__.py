"""pagedserve: a PagedAttention LLM serving engine that scales out on Ray."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import AsyncEngineArgs, AsyncLLMEngine
    from pagedserve.llm import LLM
    from pagedserve.lora_request import LoRARequest
    from pagedserve.outputs import CompletionOutput, RequestOutput
    from pagedserve.sampling_params import (
        RequestOutputKind,
        SamplingParams,
        StructuredOutputsParams,
    )

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "AsyncLLMEngine",
           "AsyncEngineArgs", "RequestOutputKind", "LoRARequest", "StructuredOutputsParams"]
__version__ = "0.1.0"

# Imported on first use, so `pagedserve plan` and `pagedserve.config` stay light
# (no torch, no transformers).
_HOMES = {"LLM": "pagedserve.llm", "SamplingParams": "pagedserve.sampling_params",
          "RequestOutputKind": "pagedserve.sampling_params",
          "StructuredOutputsParams": "pagedserve.sampling_params",
          "RequestOutput": "pagedserve.outputs", "CompletionOutput": "pagedserve.outputs",
          "AsyncLLMEngine": "pagedserve.engine.async_engine",
          "AsyncEngineArgs": "pagedserve.engine.async_engine",
          "LoRARequest": "pagedserve.lora_request"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
