"""Write a small HF model directory as a GGUF file, as llama.cpp's converter does.

Tests need GGUF files of every tensor type the loader reads, made from
weights they also hold in HF form. This writes one with the `gguf` package's
writer and quantizers: metadata under the architecture's keys, the
tokenizer's vocabulary and merges, the chat template, and tensors under
llama.cpp's names, with Llama's q/k rows permuted as convert_hf_to_gguf.py
permutes them, and Gemma 3's norm weights stored plus one (its RMSNorm scales
by 1 + weight; llama.cpp's by the weight). Norms and biases stay F32, as there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from pagedserve.model.checkpoint_files import read_checkpoint
from pagedserve.model.shape import head_dim


def write_gguf(model_dir: Path, path: Path, tensor_type: str = "F32") -> Path:
    """`model_dir` (a llama, qwen2, qwen3, qwen3_moe or gemma3_text HF directory) as the GGUF file
    `path`, its matrices stored as `tensor_type` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
    Q5_1). A MoE layer's experts are stacked into one tensor per part, as llama.cpp's
    converter stacks them."""
    import gguf

    config = AutoConfig.from_pretrained(model_dir)
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}[config.model_type]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(path, arch=arch)
    _write_config(writer, config)
    _write_tokenizer(writer, model_dir)
    state = read_checkpoint(Path(model_dir))
    name_map = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    dim = head_dim(config)
    state = _stack_experts(state)
    for hf_name, tensor in state.items():
        values = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = values.shape[0] // dim
            values = permute(values, heads)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            values = values + 1
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if values.ndim == 1:
            writer.add_tensor(gguf_name, values.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...experts.{e}.{part}.weight` of every expert as one `...experts.{part}.weight`
    [experts, rows, cols] (the merged name the gguf package maps to `ffn_*_exps`)."""
    import re

    pattern = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        match = pattern.fullmatch(name)
        if match is None:
            out[name] = tensor
        else:
            stacked.setdefault(f"{match[1]}.{match[3]}.weight", {})[int(match[2])] = tensor
    for name, experts in stacked.items():
        out[name] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's rows of each head, [2, head_dim / 2], in llama.cpp's order [head_dim / 2, 2]."""
    shaped = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
    return shaped.swapaxes(1, 2).reshape(rows.shape)


def _write_config(writer, config) -> None:
    import gguf

    writer.add_name(f"pagedserve-test-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one per layer kind; the file has the global
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _write_tokenizer(writer, model_dir: Path) -> None:
    """A byte-level BPE ("gpt2" in llama.cpp's terms), its special tokens marked as control."""
    import gguf

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens) | {t["content"] for t in spec["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def dequantized(path: Path, name: str) -> torch.Tensor:
    """One tensor of a GGUF file as the gguf package dequantizes it, in GGUF's row order."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape))


# Where a block keeps its float16 fields: (first byte, how many): d, or d and a min.
_FLOAT16_FIELDS = {"Q4_0": (0, 1), "Q8_0": (0, 1), "Q4_1": (0, 2), "Q4_K": (0, 2),
                   "Q5_K": (0, 2), "Q6_K": (208, 1)}


def rewrite_gguf(path: Path, out: Path, replace=lambda tensor: None,
                 arch: str | None = None) -> Path:
    """A copy of the GGUF file `path`: under the architecture name `arch` when given
    (its metadata keys renamed with it), and with each tensor for which `replace(tensor)`
    returns (values, raw type) holding those instead (raw type None: float values)."""
    import gguf

    reader = gguf.GGUFReader(path)
    source_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch=arch or source_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.replace(f"{source_arch}.", f"{arch}.", 1) if arch else key
        is_array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, field.contents(), field.types[0],
                             field.types[-1] if is_array else None)
    for tensor in reader.tensors:
        replaced = replace(tensor)
        if replaced is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        else:
            values, raw_type = replaced
            writer.add_tensor(tensor.name, values, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def with_random_blocks(path: Path, out: Path, types: dict[str, str], seed: int = 0) -> Path:
    """A copy of the GGUF file `path` whose matrices named in `types` (by their kind,
    such as "attn_v" or "token_embd") hold random blocks of the given type instead.

    The `gguf` package can read K-quant blocks (Q4_K, Q5_K, Q6_K) but not make them, so
    tests of those types use random ones, their scales kept small; transformers'
    loader, which dequantizes the same file, is then the oracle.
    """
    import gguf

    from pagedserve.model.gguf_blocks import TYPES

    rng = np.random.default_rng(seed)

    def random_blocks(tensor):
        parts = tensor.name.split(".")
        kind = types.get(parts[-2] if len(parts) > 2 else parts[0])
        if kind is None or len(tensor.shape) != 2:
            return None
        cols, rows = (int(n) for n in tensor.shape)
        _, size, nbytes = TYPES[kind]
        blocks = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
        # Small float16 scales (and mins): weights of about 0.01 to 0.1.
        first, count = _FLOAT16_FIELDS[kind]
        halves = rng.uniform(1e-4, 5e-4, (rows, cols // size, count)).astype(np.float16)
        blocks[..., first:first + 2 * count] = halves.view(np.uint8)
        return blocks.reshape(rows, -1), gguf.GGMLQuantizationType[kind]

    return rewrite_gguf(path, out, random_blocks)
