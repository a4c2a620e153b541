"""GGUF checkpoints (llama.cpp's format): metadata as an HF directory, tensors as slices.

A `.gguf` file holds the config, the tokenizer and chat template, and the
weights, most of them quantized in blocks along each row:

    Q4_1, one block of 32 weights:  [scale f16][min f16][32 x 4-bit]  -> 20 bytes
    a [rows, cols] tensor on disk:  [rows, cols / 32 blocks x 20 bytes]

Metadata is converted once, by transformers' GGUF support, into an HF model
directory in the cache (`metadata_dir`), so the tokenizer loads as fast as any
other. A tensor is indexed like a safetensors slice (`tensors`): indexed, it is
dequantized by the `gguf` package, and only the rows a tensor-parallel rank asks
for. A tensor of a type the CPU kernels run (gguf_blocks.py's `TYPES`: Q4_0,
Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) can instead be read as it is stored
(`quantized`): its integers, and a scale and an offset per group
(model/quantized_rows.py), for weights kept quantized in memory.

llama.cpp stores Llama's q and k projections with the rows of each head
interleaved for its rotary kernel (convert_hf_to_gguf.py, `LlamaModel.permute`);
`_unpermute` puts them back in HF's order. A MoE layer's experts are one 3-D
tensor per part (`blk.N.ffn_gate_exps`, [experts, rows, cols]); each expert is
read as the HF checkpoint's own tensor of that expert.

Gemma 3 files differ from their HF checkpoint in three ways that llama.cpp
settles in code rather than in the file, and this loader settles as it does
(llama.cpp's convert_hf_to_gguf.py and src/llama-model.cpp):
- each norm weight is stored plus one (llama.cpp's RMSNorm scales by the weight,
  Gemma's by 1 + weight), so one is subtracted at load;
- the softmax scale is head_dim^-0.5, hidden / heads for the 62-layer 27B
  (`query_pre_attn_scalar`, which the file does not carry);
- the global layers' rotary base and linear scaling are the file's `rope.*`
  keys; the local layers' base is 10,000.
transformers' GGUF reader takes neither the scale nor the scaling; `metadata_dir`
writes both into the config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from pagedserve.cache import build_dir_once, cache_dir
from pagedserve.model import gguf_blocks
from pagedserve.model.quantized_rows import QuantizedRows

logger = logging.getLogger(__name__)
# general.architecture -> the architectures our model classes implement.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
# HF model_type (as transformers reads the file) -> the HF class name.
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Architectures whose q/k rows llama.cpp permutes.
_PERMUTED = ("llama",)
# Tensor types the gguf package dequantizes; others are refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")
_MARKER = "gguf_source.json"
# An HF name of one expert's tensor, whose GGUF tensor holds all the layer's experts.
_EXPERT = re.compile(r"(?P<experts>.*\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight")


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def _reader(path: Path):
    return _reader_class()(path)


@functools.cache
def _reader_class():
    """The gguf package's GGUFReader, its header read through a plain array: each read of
    a field slices the file, a slice of an np.memmap costs several microseconds more than
    one of an ndarray, and a tokenizer's vocabulary and merges are ~250k reads."""
    from gguf import GGUFReader  # imported when a GGUF file is used

    class Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            data = self.__dict__.get("_array")
            if data is None:  # a view of the same read-only map
                data = self._array = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            array = data[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return array.view(array.dtype.newbyteorder(order))

    return Reader


def _architecture(reader, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.path={str(path)!r}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def check(path: Path, reader=None) -> None:
    """Refuse a file whose architecture or tensor types this loader cannot read."""
    reader = reader or _reader(path)
    _architecture(reader, path)
    unsupported: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            unsupported.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if unsupported:
        found = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                          for kind, names in sorted(unsupported.items()))
        raise ValueError(f"model.path={str(path)!r}: GGUF tensor types not supported: {found} "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")


def metadata_dir(path: Path, log: Callable[[str], None] = logger.info) -> Path:
    """An HF directory (config, tokenizer, chat template, generation config) made from
    the file's metadata, once per file and transformers version."""
    import transformers

    path = path.resolve()
    stat = path.stat()
    # Tokenizer files saved by one transformers major version may not load in another.
    identity = [str(path), stat.st_size, stat.st_mtime_ns, transformers.__version__]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        check(path)
        log(f"pagedserve: reading the config and tokenizer of {path.name} from its GGUF "
            "metadata (once)")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.architectures = [_HF_CLASSES[config.model_type]]
        # Keys transformers' reader skips: Qwen3's head width (not hidden / heads) and a
        # Qwen3-MoE expert's intermediate size.
        reader = _reader(path)
        arch = _architecture(reader, path)
        for key, attribute in (("attention.key_length", "head_dim"),
                               ("expert_feed_forward_length", "moe_intermediate_size")):
            field = reader.fields.get(f"{arch}.{key}")
            if field is not None:
                setattr(config, attribute, int(field.contents()))
        if arch == "gemma3":
            _gemma3_config(config, reader)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf_file": str(path)}))

    return build_dir_once(cache_dir() / "gguf" / f"{path.stem}-{key}", build, _MARKER)


def _gemma3_config(config, reader) -> None:
    """The softmax scale and the global layers' rotary scaling, as llama.cpp sets them."""
    config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads
                                    if config.num_hidden_layers == 62 else config.head_dim)
    kind = reader.fields.get("gemma3.rope.scaling.type")
    factor = reader.fields.get("gemma3.rope.scaling.factor")
    if kind is not None and kind.contents() == "linear" and factor is not None:
        config.rope_parameters["full_attention"].update(rope_type="linear",
                                                        factor=float(factor.contents()))


def unkept_types(path: Path) -> dict[str, int]:
    """Quantized matrix types of the file that no kernel runs as stored (they are
    dequantized at load), with how many tensors each."""
    counts: dict[str, int] = {}
    for tensor in _reader(path).tensors:
        kind = tensor.tensor_type.name
        if len(tensor.shape) == 2 and kind not in gguf_blocks.TYPES and kind not in FLOAT_TYPES:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def tensors(path: Path, hf_config, hf_names: list[str]) -> Iterator[tuple[str, _TensorSlice]]:
    """(HF checkpoint name, slice) for every tensor of the file.

    `hf_names` are the checkpoint names the model can take; the gguf package's
    name map says which GGUF tensor each one is.
    """
    import gguf

    reader = _reader(path)
    check(path, reader)
    arch = _architecture(reader, path)
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_id, hf_config.num_hidden_layers)
    # GGUF name -> (HF name, expert): one GGUF tensor holds every expert of a layer's part.
    to_hf: dict[str, list[tuple[str, int | None]]] = {}
    for hf_name in hf_names:
        match = _EXPERT.fullmatch(hf_name)
        merged = f"{match['experts']}.{match['part']}.weight" if match else hf_name
        gguf_name = name_map.get_name(merged, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            to_hf.setdefault(gguf_name, []).append(
                (hf_name, int(match["expert"]) if match else None))
    heads = {"attn_q": hf_config.num_attention_heads, "attn_k": hf_config.num_key_value_heads}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # rotary factors: the config carries them
            continue
        if tensor.name not in to_hf:
            raise ValueError(f"GGUF tensor {tensor.name!r} in {path} has no place in the model")
        kind = tensor.name.split(".")[-2]
        shift = 1.0 if arch == "gemma3" and kind.endswith("norm") else 0.0
        for hf_name, expert in to_hf[tensor.name]:
            yield hf_name, _TensorSlice(tensor, heads.get(kind) if arch in _PERMUTED else None,
                                        expert, shift)


class _TensorSlice:
    """One tensor in HF's layout [rows, cols] (one expert's, of a stacked experts tensor),
    dequantized only where it is indexed, less `shift` (what the converter added)."""

    def __init__(self, tensor, permuted_heads: int | None, expert: int | None = None,
                 shift: float = 0.0) -> None:
        self.tensor = tensor
        self.permuted_heads = permuted_heads  # llama.cpp interleaved the rows of these heads
        self.expert = expert
        self.shift = shift

    @property
    def kept_quantized(self) -> bool:
        """Whether `quantized` reads this tensor (a kept type, and a matrix)."""
        return self.tensor.tensor_type.name in gguf_blocks.TYPES and len(self.get_shape()) == 2

    def quantized(self, rows: slice, cols: slice) -> QuantizedRows:
        """Rows and columns of the tensor as stored (model/gguf_blocks.py): integers with
        a scale and an offset per group. Columns must start and end on a block."""
        shape = self.get_shape()
        kind = self.tensor.tensor_type.name
        bits, size, nbytes = gguf_blocks.TYPES[kind]
        start, stop, _ = rows.indices(shape[0])
        first, last, _ = cols.indices(shape[1])
        if first % size or (last % size and last != shape[1]):
            raise ValueError(f"columns {first}..{last} cut a {kind} block of {size}")
        data = self.tensor.data if self.expert is None else self.tensor.data[self.expert]
        blocks = np.asarray(data[start:stop]).reshape(stop - start, -1, nbytes)
        q, scales, offsets, group = gguf_blocks.decode(
            kind, blocks[:, first // size:-(-last // size)])
        if self.permuted_heads:
            head_dim = shape[0] // self.permuted_heads
            q, scales = _unpermute(q, start, head_dim), _unpermute(scales, start, head_dim)
            offsets = None if offsets is None else _unpermute(offsets, start, head_dim)
        return QuantizedRows(_tensor(q), _tensor(scales),
                             None if offsets is None else _tensor(offsets), bits, group)

    def get_shape(self) -> tuple[int, ...]:
        shape = tuple(int(n) for n in reversed(self.tensor.shape))  # GGUF lists a row first
        return shape if self.expert is None else shape[1:]

    def __getitem__(self, key) -> torch.Tensor:
        from gguf import dequantize

        shape = self.get_shape()
        data = self.tensor.data if self.expert is None else self.tensor.data[self.expert]
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        start, stop, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError(f"GGUF tensor {self.tensor.name!r}: only contiguous rows are read")
        if len(shape) == 1:  # norms and biases: small, read whole
            values = dequantize(data, self.tensor.tensor_type).reshape(shape)
            values = values[start:stop]
        else:
            values = dequantize(data[start:stop], self.tensor.tensor_type)
            values = values.reshape(stop - start, *shape[1:])
        if self.permuted_heads:
            values = _unpermute(values, start, shape[0] // self.permuted_heads)
        if self.shift:
            values = values - np.float32(self.shift)
        index = (slice(None), *rest)
        values = np.ascontiguousarray(values[index])
        if not values.flags.writeable:  # a view of the read-only memory map
            values = values.copy()
        return torch.from_numpy(values)


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values))


def _unpermute(rows: np.ndarray, start: int, head_dim: int) -> np.ndarray:
    """llama.cpp's order within a head, [head_dim / 2, 2], back to HF's [2, head_dim / 2].

    `rows` [n, ...] starts at row `start` of the full tensor; both must be whole heads.
    """
    if start % head_dim or rows.shape[0] % head_dim:
        raise ValueError(f"rows {start}..{start + rows.shape[0]} split a head of {head_dim} rows")
    heads = rows.shape[0] // head_dim
    shaped = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])
    return shaped.swapaxes(1, 2).reshape(rows.shape)
