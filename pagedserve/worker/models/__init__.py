"""Model registry and weight loading (HF directories, hub ids, GGUF files)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pagedserve.model.checkpoint_files import checkpoint_tensors
from pagedserve.model.gguf_file import tensors as gguf_tensors
from pagedserve.model.gguf_file import unkept_types
from pagedserve.model.quant_scheme import WeightScheme
from pagedserve.model.quantized_checkpoint import joined as joined_quantized
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers import default_dtype
from pagedserve.worker.layers.kv_scales import load_kv_scale
from pagedserve.worker.layers.linear import default_weight_loader, pack_linear_weights
from pagedserve.worker.layers.moe import EXPERT_PARTS
from pagedserve.worker.layers.quantized import finalize as finalize_quantized
from pagedserve.worker.layers.quantized import quantized_loading
from pagedserve.worker.models.gemma3 import Gemma3ForCausalLM
from pagedserve.worker.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
}
# One expert's tensor: `...experts.{e}.{part}.weight` (layers/moe.py's EXPERT_PARTS).
_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


def model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ValueError(f"model architectures={hf_config.architectures!r} are not supported "
                     f"(supported: {', '.join(sorted(_ARCHITECTURES))})")


def build_model(hf_config, model_dir: Path, *, max_position: int, dtype: torch.dtype,
                device: torch.device, load_format: str, tp: TPGroup = TPGroup(),
                gguf_file: Path | None = None, pack_cpu_weights: bool = True,
                checkpoint: dict[str, torch.Tensor] | None = None,
                expert_parallel: bool = False, keep_quantized: bool = False,
                weight_scheme: WeightScheme | None = None) -> nn.Module:
    """This rank's shard of the model, with its weights (or random ones for "dummy").

    Weights come from `checkpoint` when given (whole tensors by checkpoint name:
    the object store's copy), else from the checkpoint files of `model_dir`
    (safetensors or .bin, model/checkpoint_files.py), or from `gguf_file` when set.
    Parameters are created on `device` in `dtype` and left uninitialised until
    they are loaded or drawn; buffers built in float32 (the rotary table) are
    cast after. On the CPU, linear weights are then packed for oneDNN's GEMM
    (layers/linear.py), unless `pack_cpu_weights` is False.

    A quantized HF checkpoint (`weight_scheme`: model/quant_scheme.py) has each
    layer's parts joined into one weight (model/quantized_checkpoint.py); the
    online FP8 scheme quantizes a float checkpoint's linear weights as they load.
    With `keep_quantized`, those weights, and the GGUF file's of the types the
    kernels run, stay quantized in memory (layers/quantized.py): packed for the C++
    kernel on the CPU, for the Triton GEMM or torch._scaled_mm on CUDA.
    """
    source = gguf_file.name if gguf_file is not None else str(model_dir)
    quantize = keep_quantized and (weight_scheme is not None
                                   or (gguf_file is not None and checkpoint is None))
    loading = quantized_loading() if quantize else contextlib.nullcontext()
    with torch.device(device), default_dtype(dtype), loading:
        model = model_class(hf_config)(hf_config, max_position, tp,
                                       expert_parallel=expert_parallel)
    model.to(dtype=dtype)
    if load_format == "dummy":
        init_dummy(model)
    elif checkpoint is not None:
        load_weights(model, _joined(checkpoint.items(), weight_scheme),
                     "the object store's checkpoint")
    elif gguf_file is not None:
        load_weights(model, gguf_tensors(gguf_file, hf_config, checkpoint_names(model)),
                     str(gguf_file))
        if quantize:
            kept = finalize_quantized(model, dtype, device)
            logger.info("%s: %d weights kept quantized", gguf_file.name, kept)
            unkept = unkept_types(gguf_file)
            if unkept:
                logger.warning("%s: %s dequantized into %s: no kernel runs these types as "
                               "stored yet", gguf_file.name, ", ".join(
                                   f"{kind} ({count} tensors)" for kind, count in unkept.items()),
                               dtype)
    else:
        load_weights(model, _joined(checkpoint_tensors(model_dir), weight_scheme), str(model_dir))
    if quantize and gguf_file is None:
        kept = finalize_quantized(model, dtype, device)
        logger.info("%s: %d weights kept quantized (%s %s)", source, kept, weight_scheme.method,
                    weight_scheme.name)
    model.eval().requires_grad_(False)
    if device.type == "cpu" and pack_cpu_weights:
        pack_linear_weights(model)
    return model


def _joined(tensors: Iterable[tuple[str, object]], scheme: WeightScheme | None
            ) -> Iterable[tuple[str, object]]:
    return tensors if scheme is None else joined_quantized(tensors, scheme)


def checkpoint_names(model: nn.Module) -> list[str]:
    """The HF checkpoint names the model takes: fused parameters by their parts, a MoE
    layer's experts one by one (Qwen3-MoE's names; Mixtral's `w1`, `w3`, `w2` are
    accepted too)."""
    names = ["lm_head.weight"]  # also when tied to the embedding (then loaded through it)
    for name, param in model.named_parameters():
        experts, _, which = name.rpartition(".")
        if experts.endswith(".experts") and which in ("w13", "w2"):
            parts = ["gate_proj", "up_proj"] if which == "w13" else ["down_proj"]
            names.extend(f"{experts}.{e}.{part}.weight"
                         for e in range(param.num_parts // len(parts)) for part in parts)
            continue
        parts = [name.replace(f".{fused}.", f".{part}.")
                 for fused, part, _ in model.stacked_params if f".{fused}." in name]
        names.extend(parts or [name])
    return names


def load_weights(model: nn.Module, checkpoint: Iterable[tuple[str, object]], source: str) -> None:
    """Copy this rank's slice of every checkpoint tensor into the model.

    Each parameter's `weight_loader` indexes only the rows or columns its rank
    holds, so no rank reads (or holds) the whole model.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in checkpoint:
        if "rotary_emb" in ckpt_name or load_kv_scale(model, ckpt_name, tensor):
            continue  # a KV cache scale lands on its layer's Attention (layers/kv_scales.py)
        name, shard_id = _target(model, ckpt_name)
        if name not in params:
            if name == "lm_head.weight":  # tied to the embedding: loaded through it
                continue
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
        param = params[name]
        try:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
        except ValueError as error:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} {error}") from None
        loaded.add(name if shard_id is None else f"{name}#{shard_id}")
    missing = sorted(_expected_entries(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {source} lacks tensors for: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def _target(model: nn.Module, ckpt_name: str) -> tuple[str, int | None]:
    """The parameter a checkpoint tensor fills, and which part of it (None: the whole)."""
    for theirs, ours in getattr(model, "checkpoint_renames", ()):
        ckpt_name = ckpt_name.replace(theirs, ours)
    expert = _EXPERT.match(ckpt_name)
    if expert and expert["part"] in EXPERT_PARTS:
        which, part = EXPERT_PARTS[expert["part"]]
        index = int(expert["expert"])
        return f"{expert['experts']}.{which}", 2 * index + part if which == "w13" else index
    for fused, part, shard_id in model.stacked_params:
        if f".{part}." in ckpt_name:
            return ckpt_name.replace(f".{part}.", f".{fused}."), shard_id
    return ckpt_name, None


def _expected_entries(params: dict[str, torch.Tensor]) -> set[str]:
    """Every parameter, and each part of a fused one, must come from the checkpoint."""
    expected = set()
    for name, param in params.items():
        parts = getattr(param, "num_parts", 1)
        expected.update([name] if parts == 1 else (f"{name}#{i}" for i in range(parts)))
    return expected


def init_dummy(model: nn.Module) -> None:
    """Random weights for benchmarks: small normal values, norms at one; drawn on the
    model's device in its dtype. Integer tables (an EAGLE-3 head's d2t) stay zero."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
