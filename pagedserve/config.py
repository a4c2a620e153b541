"""Configuration schema: the one place where defaults live and input is validated.

A YAML file (or the keyword arguments of `LLM`) is parsed once into these
frozen pydantic models; everything downstream receives them through its
constructor and never mutates them. Values that depend on the model or the
machine (the real `max_model_len`, dtype, number of KV blocks) are resolved at
engine build time into separate frozen objects, not written back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomModelSpec(_Strict):
    """A random-weight model built on first use into the local cache."""

    name: str = "tiny-llama"
    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    seed: int = 0
    config_overrides: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    path: str | None = None
    random_init: RandomModelSpec | None = None
    dtype: DType = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    skip_tokenizer_init: bool = False
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.random_init is None):
            raise ValueError("exactly one of model.path and model.random_init must be set")
        return self


class EngineConfig(_Strict):
    block_size: int = Field(default=16, ge=1, le=256)
    num_gpu_blocks: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory_gb: float = Field(default=1.0, gt=0.0)
    swap_space: float = Field(default=4.0, ge=0.0)
    enable_prefix_caching: bool = True
    # Under memory pressure: auto recomputes single-sequence requests and swaps
    # those with several sequences (samples, beams) to the CPU pool of swap_space GiB.
    preemption_mode: Literal["auto", "swap", "recompute"] = "auto"
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    enforce_eager: bool = False
    # auto: Triton kernels on CUDA, the torch reference on CPU.
    attention_backend: Literal["auto", "triton", "torch"] = "auto"
    tensor_parallel_size: int = Field(default=1, ge=1)
    device: Device = "auto"
    seed: int = 0

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two between 1 and 256, got {value}")
        return value

    @field_validator("tensor_parallel_size")
    @classmethod
    def _single_rank(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"tensor_parallel_size={value} is not supported by the in-process engine; "
                "only tensor_parallel_size=1 runs here"
            )
        return value


class Config(_Strict):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config mapping; errors name the key path, the value and the rule."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ValueError(_format_errors(error, source)) from None


def load(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    path = Path(path)
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return parse(data, str(path))
