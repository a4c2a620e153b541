"""Tiny random-weight Hugging Face models: `model.random_init`, and the tests' models.

Where no real checkpoint can be had (CI, a machine without a model hub), a
model that is small, fast, deterministic and still *real* serves: an
ordinary HF model directory (config, safetensors weights, tokenizer, chat
template) that goes through the exact same loading code as a production
checkpoint. This module builds one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)

from pagedserve.cache import cache_dir as default_cache_dir

# Bump when the output of build_random_model changes (corpus, defaults,
# tokenizer recipe...) so that stale cached models are not reused.
FORMAT_VERSION = 3

ARCHS: dict[str, type[PretrainedConfig]] = {
    "gemma3": Gemma3TextConfig,
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "mixtral": MixtralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
}
# The Qwen families: AutoTokenizer loads them with Qwen2Tokenizer (see train_tokenizer).
QWEN_ARCHS = ("qwen2", "qwen3", "qwen3_moe")
# What a tiny model of an architecture needs beside DEFAULT_CONFIG: full attention, a
# head width of its own (Qwen3's is not hidden_size / heads), and small experts.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # Layers 0 and 2 over a window of 24, layer 1 full; each kind its own rotary base.
    "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
               "num_hidden_layers": 3, "num_key_value_heads": 2,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
               "tie_word_embeddings": True},
    "mistral": {"sliding_window": None},
    "mixtral": {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3": {"head_dim": 32},
    "qwen3_moe": {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64},
}

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header|>", "<|end_header|>", "<|eot|>"
# Order matters: the BPE trainer gives special tokens the first ids (0..5).
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

DEFAULT_VOCAB_SIZE = 512
# 256 byte-level symbols + the special tokens: no byte-level BPE can be smaller.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,  # MHA; pass num_key_value_heads=1 (or 2) for GQA/MQA
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    # Deliberately 5x HF's 0.02: with larger weights the logits of a tiny
    # random model are far apart, so greedy argmax is not a near-tie that
    # float rounding differences (paged vs. reference attention, fused
    # kernels, batch composition) could flip.
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}

# Llama-3-like template: the BOS token, then per message
# <|start_header|>role<|end_header|>\n\ncontent<|eot|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header|>' + message['role'] + '<|end_header|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header|>assistant<|end_header|>\n\n' }}"
    "{% endif %}"
)


def _corpus_text() -> str:
    """The bundled training text (read as package data so it works from a wheel)."""
    return resources.files("pagedserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, arch: str = "llama") -> Tokenizer:
    """Train a byte-level BPE on the bundled corpus.

    Byte-level means every string (any Unicode) round-trips exactly, which a
    serving engine's detokenizer tests rely on.  The result is deterministic:
    the BPE trainer breaks count ties by pair id, and ids come from the fixed
    byte alphabet plus the fixed corpus.
    """
    tok = Tokenizer(models.BPE())
    if arch in QWEN_ARCHS:
        # AutoTokenizer always loads qwen2 checkpoints with Qwen2Tokenizer,
        # which keeps our vocab/merges but rebuilds normalizer and
        # pre-tokenizer as below.  Train with the same ones, as real Qwen2
        # checkpoints do, so tokenizer.json and AutoTokenizer agree.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus_text().splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend BOS like Llama does, so tok("hi").input_ids[0] == bos_token_id.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def config_kwargs(arch: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config arguments of a random model of `arch`, before its vocabulary is known."""
    kwargs: dict[str, Any] = dict(DEFAULT_CONFIG)
    kwargs.update(ARCH_DEFAULTS.get(arch, {}))
    kwargs.update(overrides)
    return kwargs


def build_random_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random-weight HF causal-LM directory at ``path``.

    ``vocab_size`` is the model's embedding size.  ``None`` means "exactly the
    tokenizer's size" (BPE trained to at most 512 tokens).  A value below 512
    also shrinks the tokenizer; a larger one pads the embedding past the
    tokenizer, as many real checkpoints do.  ``config_overrides`` go straight
    to the config class (e.g. ``num_key_value_heads=1``, ``rope_parameters=``).

    The directory is built in a temporary sibling and renamed into place, so a
    crash never leaves a half-written model at ``path``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch={arch!r}; allowed: {sorted(ARCHS)}")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte-level tokenizer "
            f"needs at least {MIN_VOCAB_SIZE} tokens"
        )
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"refusing to overwrite non-empty {path}")
    path.parent.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(min(vocab_size or DEFAULT_VOCAB_SIZE, DEFAULT_VOCAB_SIZE), arch)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    n_vocab = vocab_size if vocab_size is not None else tok.get_vocab_size()

    kwargs = config_kwargs(arch, config_overrides)
    kwargs.update(
        vocab_size=n_vocab, bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]
    )
    config = ARCHS[arch](**kwargs)

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        # fork_rng: seed the init without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            # HF starts biases at zero, where a bias added twice (or never)
            # changes nothing: give them values so tests can tell.
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(".bias"):
                        param.normal_(0.0, 0.02)
        # As Llama 3 does, generation also ends at the end of a chat turn.
        model.generation_config = GenerationConfig(
            bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], pad_token_id=ids[PAD]
        )
        model.save_pretrained(tmp, safe_serialization=True)

        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=None,  # stored as null: stops Qwen2Tokenizer adding its own unk
            additional_special_tokens=[START_HEADER, END_HEADER, EOT],
            model_max_length=config.max_position_embeddings,
            clean_up_tokenization_spaces=False,
        )
        hf_tok.chat_template = CHAT_TEMPLATE
        hf_tok.save_pretrained(tmp)
        try:
            os.rename(tmp, path)  # atomic; also replaces an empty directory
        except OSError as e:
            if path.exists():
                raise FileExistsError(f"{path} appeared while building") from e
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cache_key(arch: str, seed: int, overrides: dict[str, Any]) -> str:
    """Short stable hash of everything that determines the built model."""
    blob = json.dumps(
        {"arch": arch, "seed": seed, "overrides": overrides, "version": FORMAT_VERSION},
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_random_model(
    name: str = "tiny-llama",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    arch: str = "llama",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a random model once per (arch, seed, overrides) and reuse it.

    Lives under ``<cache_dir>/models/<name>-<hash>``; ``cache_dir`` defaults to
    ``$PAGEDSERVE_CACHE_DIR`` or ``~/.cache/pagedserve``.  Safe when several
    processes race: each builds privately and renames into place; a loser of
    the rename throws its copy away and uses the winner's (identical) one.
    """
    if cache_dir is None:
        cache_dir = default_cache_dir()
    target = Path(cache_dir) / "models" / f"{name}-{_cache_key(arch, seed, config_overrides)}"
    # Only complete directories are ever renamed into place, so presence of
    # config.json means the model is finished.
    if (target / "config.json").is_file():
        return target
    try:
        return build_random_model(target, arch, seed=seed, **config_overrides)
    except FileExistsError:
        if (target / "config.json").is_file():
            return target
        raise
