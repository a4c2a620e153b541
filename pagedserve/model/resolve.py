"""Resolve a ModelConfig against the model and the machine, once, at engine build.

The result (`ModelInfo`, model/info.py) is frozen: the directory holding
the HF config and tokenizer, the GGUF file when the weights come from one,
the real max_model_len, dtype and device, and the token ids that end a
sequence. Nothing here starts Ray: the device of Ray workers is chosen where
the executor is (engine/executors.py) and passed in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from pagedserve.config import ModelConfig, ParallelConfig
from pagedserve.model import embedded, gguf_file
from pagedserve.model.checkpoint_files import hub_snapshot
from pagedserve.model.info import ModelInfo, PlainConfig
from pagedserve.model.quant_scheme import WeightScheme, scheme_of
from pagedserve.model.random_model import cached_random_model
from pagedserve.model.rules import check_tensor_parallel, max_model_len, served_dtype
from pagedserve.model.shape import PRESET_HUB_IDS_KEY, ModelShape, preset_for

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(model: ModelConfig, device: torch.device,
            parallel: ParallelConfig = ParallelConfig(), simulated: bool = False) -> ModelInfo:
    """`device` is where the workers run (engine/executors.py chooses it).

    A `simulated` model needs only its shape: a hub id with a bundled preset is
    taken from the preset, without its weights or the hub.
    """
    preset = preset_for(model.path) if simulated and model.path else None
    if preset is not None:
        hf_config = AutoConfig.for_model(**{key: value for key, value in preset.items()
                                            if key != PRESET_HUB_IDS_KEY})
        directory, gguf, hub_id = None, None, None
    else:
        directory, gguf, hub_id = locate(model)
        hf_config = load_hf_config(directory, model.trust_remote_code)
    tokenizer_dir = locate_tokenizer(model.tokenizer) if model.tokenizer else None
    if directory is None:
        if tokenizer_dir is None:
            raise ValueError(f"model.path={model.path!r} is simulated from its bundled preset, "
                             "which has no tokenizer: set model.tokenizer (a tokenizer "
                             "directory, or an embedded model's name such as "
                             f"{next(iter(embedded.MODELS))!r})")
        directory = tokenizer_dir  # the model has no files of its own here
    shape = ModelShape.from_config(hf_config, model.path or str(directory), model.quantization)
    check_tensor_parallel(shape, parallel.tensor_parallel_size, parallel.enable_expert_parallel)
    # A tokenizer borrowed for a preset's shape brings its own end-of-text token (with a
    # preset, `directory` is that tokenizer's).
    eos_source = directory
    return ModelInfo(
        model_dir=directory,
        hf_config=plain_config(hf_config),
        shape=shape,
        max_model_len=max_model_len(model.max_model_len, shape),
        dtype=_DTYPES[served_dtype(model.dtype, shape.saved_dtype, device.type)],
        device=device,
        eos_token_ids=_eos_token_ids(eos_source, hf_config if preset is None else None),
        vocab_size=hf_config.vocab_size,
        gguf_file=gguf,
        tokenizer_dir=tokenizer_dir,
        hub_id=hub_id,
        weights_transfer=model.weights_transfer,
        expert_parallel=parallel.enable_expert_parallel,
        quantization=model.quantization,
        weight_scheme=_weight_scheme(model, hf_config, gguf),
    )


def plain_config(config: PretrainedConfig) -> PlainConfig:
    """The config's fields, and its class's aliases (Mixtral's `num_experts`), for
    ModelInfo, which every rank process unpickles. The model's own config class would
    import transformers' model registry and, through its validators, torch's DTensor,
    in each rank before its first step, for fields the rank reads as plain attributes.
    A model's own code (trust_remote_code) stays in the engine."""
    if isinstance(config, PlainConfig):
        return config
    plain = PlainConfig(**config.to_dict())
    for alias, field in type(config).attribute_map.items():
        setattr(plain, alias, getattr(config, field))
    return plain


def _weight_scheme(model: ModelConfig, hf_config: PretrainedConfig, gguf: Path | None
                   ) -> WeightScheme | None:
    """The checkpoint's quantization (model/quant_scheme.py): refused here, at start, where
    no kernel of ours runs it."""
    if gguf is not None:
        if model.quantization == "fp8":
            raise ValueError("model.quantization='fp8' quantizes an HF checkpoint's float "
                             f"weights at load; {gguf.name} is a GGUF file, whose own types "
                             "are served (set model.quantization to 'auto' or 'dequantize')")
        return None
    return scheme_of(hf_config.to_dict(), model.quantization, model.path or "the model")


def locate_tokenizer(name: str) -> Path:
    """model.tokenizer: an embedded model's name (its HF metadata directory holds the
    tokenizer), a local directory, or a hub id."""
    if name in embedded.MODELS:
        return gguf_file.metadata_dir(embedded.fetch(name, log=logger.warning),
                                      log=logger.warning)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["tokenizer*", "*.json", "*.model",
                                                        "*.jinja"]))


def load_hf_config(directory: Path, trust_remote_code: bool) -> PretrainedConfig:
    """config.json, through transformers; a model's own Python runs only when trusted."""
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(f"the model at {directory} ships its own code (config.json auto_map), "
                         "which runs only with model.trust_remote_code: true (trust_remote_code="
                         "True for LLM); leave it off unless you have read that code") from None


def locate(model: ModelConfig) -> tuple[Path, Path | None, str | None]:
    """The model's local directory (config, tokenizer), its GGUF file if any, and its
    hub id if it came from the hub.

    The directory is the path, a hub snapshot, the built random model, or, for a
    GGUF file (the embedded model is one), an HF directory made from its metadata.
    """
    if model.random_init is not None:
        spec = model.random_init
        return cached_random_model(spec.name, arch=spec.arch, seed=spec.seed,
                                   **spec.config_overrides), None, None
    if model.embedded is not None:
        gguf = embedded.fetch(model.embedded, log=logger.warning)
        return gguf_file.metadata_dir(gguf, log=logger.warning), gguf, None
    assert model.path is not None  # ModelConfig sets exactly one source
    path = Path(model.path).expanduser()
    if path.is_dir():
        return path, None, None
    if gguf_file.is_gguf(path):
        return gguf_file.metadata_dir(path, log=logger.warning), path.resolve(), None
    if path.exists():
        raise ValueError(f"model.path={model.path!r} is a file but not a .gguf file; expected "
                         "a model directory, a hub id or a GGUF file")
    if path.suffix == ".gguf":
        raise ValueError(f"model.path={model.path!r}: no such GGUF file")
    return hub_snapshot(model.path), None, model.path




def _eos_token_ids(model_dir: Path, hf_config: PretrainedConfig | None) -> frozenset[int]:
    """From generation_config.json, else the model's config (`hf_config` None: the
    directory's own config.json)."""
    eos = None
    if (model_dir / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None and hf_config is None and (model_dir / "config.json").exists():
        hf_config = AutoConfig.from_pretrained(model_dir)
    if eos is None and hf_config is not None:
        eos = hf_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, (list, tuple)) else [eos])
