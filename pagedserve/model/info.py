"""What the engine resolved about its model, for every worker: a frozen record.

model/resolve.py makes it once, at engine build; workers (in this process or
in Ray actors) receive it pickled and build the model from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from pagedserve.config import LoRAConfig
from pagedserve.model.quant_scheme import WeightScheme
from pagedserve.model.shape import ModelShape


class PlainConfig(PretrainedConfig):
    """A model's HF config fields on transformers' base class (model/resolve.py's
    plain_config): the same attributes, and `to_dict` the same dict, model_type
    included."""

    def to_dict(self) -> dict:
        return {**super().to_dict(), "model_type": self.model_type}


@dataclass(frozen=True)
class ModelInfo:
    model_dir: Path  # config and tokenizer files (and the checkpoint files, if no gguf_file)
    hf_config: PlainConfig
    shape: ModelShape  # hf_config's numbers, as the planner and the simulated GPU read them
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: frozenset[int]
    vocab_size: int
    gguf_file: Path | None = None  # the weights, when they come from a GGUF file
    tokenizer_dir: Path | None = None  # model.tokenizer's directory; None: model_dir
    # The adapter slots the model is built with (worker/worker_lora.py); None: no LoRA.
    lora: LoRAConfig | None = None
    # model.path when it is a hub id: a worker on another node resolves it through that
    # node's own hub cache, since model_dir is a path on the engine's node.
    hub_id: str | None = None
    weights_transfer: str = "files"  # model.weights_transfer
    expert_parallel: bool = False  # parallel.enable_expert_parallel, for a MoE model
    quantization: str = "auto"  # model.quantization
    # How the checkpoint's linear weights are quantized (or are to be, for "fp8").
    weight_scheme: WeightScheme | None = None
    # Speculative decoding's draft model (engine.speculative's `model`), built beside
    # this one on the worker (worker/draft.py); None: no draft model.
    draft: ModelInfo | None = None
    # On a draft: how it drafts. "draft_model": a model of its own (worker/draft.py);
    # "eagle", "eagle3": a head over the target's hidden states (worker/eagle_draft.py).
    draft_method: str = "draft_model"

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer_dir or self.model_dir
