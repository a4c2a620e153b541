"""LoRA adapters as requests name them, and their PEFT configs (vLLM's names).

    LoRARequest("math_lora", 1, "./math_lora")   # a directory as `peft` saves it

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
(PeftModel.save_pretrained). `read_adapter_config` reads and checks the
config, without torch, so a request naming a bad adapter is refused before
anything is scheduled or loaded; worker/lora_weights.py reads the weights.

Supported: LoRA on any of the attention and MLP projections of the decoder
layers (q, k, v, o, gate, up, down), one rank and alpha for all of them,
scaling `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`). Refused, with
the reason: DoRA, `modules_to_save`, adapters on the embedding or the LM head,
per-module ranks, bias training, and a rank over `max_lora_rank`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pagedserve.errors import RequestError

# Our projections, in the order of their fused layers: q, k, v -> qkv_proj; gate, up -> gate_up.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PARAM = "lora_request"


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: a name, a positive integer id unique per adapter, its directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise RequestError(_PARAM, f"lora_name must be a non-empty string, got "
                                       f"{self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise RequestError(_PARAM, f"lora_int_id must be an integer >= 1, got "
                                       f"{self.lora_int_id!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter's config says, checked: the modules it adapts, its rank and scaling."""

    path: Path
    rank: int
    scaling: float
    target_modules: tuple[str, ...]  # a subset of TARGET_MODULES, in that order
    layers: tuple[int, ...] | None  # `layers_to_transform`; None: every layer
    # Who asks for it: set when an engine registers the adapter under a request's name and id.
    name: str = ""
    lora_id: int = 0


def read_adapter_config(path: str | Path, max_lora_rank: int) -> AdapterSpec:
    """The adapter at `path`, checked against what the engine supports; RequestError if not."""
    directory = Path(path)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise RequestError(_PARAM, f"lora_path {str(directory)!r} has no {needed.name}: "
                                       "an adapter directory as peft saves it is expected")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(_PARAM, f"{config_file}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise RequestError(_PARAM, f"{config_file}: expected a JSON object")

    def refuse(reason: str) -> RequestError:
        return RequestError(_PARAM, f"adapter {str(directory)!r}: {reason}")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} is not supported, only LORA")
    if config.get("use_dora"):
        raise refuse("DoRA (use_dora) is not supported")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save {config['modules_to_save']!r} is not supported: "
                     "only LoRA weights are applied")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config['bias']!r} is not supported, only 'none'")
    if config.get("target_parameters"):
        raise refuse(f"target_parameters {config['target_parameters']!r} (adapters of parameters, "
                     "such as a mixture of experts' stacked expert weights) are not supported: "
                     "adapters may adapt the projections of target_modules")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out (Conv1D-style weights) is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise refuse("per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise refuse(f"rank {rank} exceeds max_lora_rank={max_lora_rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise refuse(f"lora_alpha must be a positive number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list)
                                   and all(isinstance(i, int) and i >= 0 for i in layers)):
        raise refuse(f"layers_to_transform must be layer indices, got {layers!r}")
    return AdapterSpec(path=directory, rank=rank, scaling=float(scaling),
                       target_modules=_targets(config.get("target_modules"), refuse),
                       layers=tuple(sorted(set(layers))) if layers is not None else None)


def _targets(given, refuse) -> tuple[str, ...]:
    """PEFT's target_modules (names, or one regex over module paths) as our projections."""
    if isinstance(given, str):  # a regex matched against the full module path
        pattern = re.compile(given)
        names = {name for name in TARGET_MODULES
                 if pattern.fullmatch(f"model.layers.0.self_attn.{name}")
                 or pattern.fullmatch(f"model.layers.0.mlp.{name}")}
        others = [m for m in ("embed_tokens", "lm_head") if pattern.fullmatch(m)
                  or pattern.fullmatch(f"model.{m}")]
    elif isinstance(given, list) and all(isinstance(name, str) for name in given):
        names = {name.rsplit(".", 1)[-1] for name in given}
        others = sorted(names - set(TARGET_MODULES))
    else:
        raise refuse(f"target_modules must be a list of module names or a regex, got {given!r}")
    if others:
        raise refuse(f"target modules {sorted(others)} are not supported; supported: "
                     f"{list(TARGET_MODULES)}")
    if not names:
        raise refuse(f"target_modules {given!r} names none of {list(TARGET_MODULES)}")
    return tuple(name for name in TARGET_MODULES if name in names)
