"""Each tensor-parallel rank loads exactly its slice of the checkpoint, and reads no more.

Ranks are built in this process without torch.distributed (a TPGroup without
a process group knows its shard); the collectives are exercised by
test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pagedserve.model import checkpoint_files
from pagedserve.model.shape import head_dim
from pagedserve.testing import build_random_model
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.models import build_model

# 16 query heads, 8 KV heads; a vocabulary 4 does not divide; biases everywhere:
# column-parallel ones are split with their rows, row-parallel ones kept whole.
MODEL = dict(arch="llama", vocab_size=510, hidden_size=64, num_attention_heads=16,
             num_key_value_heads=8, intermediate_size=96, num_hidden_layers=2,
             attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = build_random_model(tmp_path_factory.mktemp("tp-load") / "m", **MODEL)
    (file,) = model_dir.glob("*.safetensors")
    return model_dir, load_file(file)


def _build(model_dir, rank: int, size: int):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = build_model(config, model_dir, max_position=128, dtype=torch.float32,
                        device=torch.device("cpu"), load_format="safetensors",
                        tp=TPGroup(rank, size), pack_cpu_weights=False)  # the loaded slices
    return config, model


def _rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    part = tensor.shape[0] // size
    return tensor[rank * part:(rank + 1) * part]


def _cols(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    part = tensor.shape[1] // size
    return tensor[:, rank * part:(rank + 1) * part]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_each_rank_holds_its_slice(checkpoint, size):
    model_dir, full = checkpoint
    for rank in range(size):
        config, model = _build(model_dir, rank, size)
        params = dict(model.named_parameters())
        for layer in range(config.num_hidden_layers):
            ours = f"model.layers.{layer}."
            attn, mlp = ours + "self_attn.", ours + "mlp."
            q, k, v = (full[f"{attn}{name}_proj.weight"] for name in "qkv")
            expected_qkv = torch.cat([_rows(q, rank, size), _rows(k, rank, size),
                                      _rows(v, rank, size)])
            assert torch.equal(params[attn + "qkv_proj.weight"], expected_qkv)
            qb, kb, vb = (full[f"{attn}{name}_proj.bias"] for name in "qkv")
            assert torch.equal(params[attn + "qkv_proj.bias"], torch.cat(
                [_rows(qb, rank, size), _rows(kb, rank, size), _rows(vb, rank, size)]))
            assert torch.equal(params[attn + "o_proj.weight"],
                               _cols(full[attn + "o_proj.weight"], rank, size))
            gate, up = full[mlp + "gate_proj.weight"], full[mlp + "up_proj.weight"]
            assert torch.equal(params[mlp + "gate_up_proj.weight"],
                               torch.cat([_rows(gate, rank, size), _rows(up, rank, size)]))
            assert torch.equal(params[mlp + "down_proj.weight"],
                               _cols(full[mlp + "down_proj.weight"], rank, size))
            gate_b, up_b = full[mlp + "gate_proj.bias"], full[mlp + "up_proj.bias"]
            assert torch.equal(params[mlp + "gate_up_proj.bias"],
                               torch.cat([_rows(gate_b, rank, size), _rows(up_b, rank, size)]))
            for row_parallel in (attn + "o_proj.bias", mlp + "down_proj.bias"):
                assert torch.equal(params[row_parallel], full[row_parallel])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                assert torch.equal(params[f"{ours}{norm}.weight"], full[f"{ours}{norm}.weight"])
        # Vocab rows: ceil(510 / size) per rank, the last rank's tail is zero padding.
        rows = -(-config.vocab_size // size)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name not in params:  # tied
                continue
            real = full[name][rank * rows:(rank + 1) * rows]
            assert params[name].shape[0] == rows
            assert torch.equal(params[name][:len(real)], real)
            assert not params[name][len(real):].any()
        assert torch.equal(params["model.norm.weight"], full["model.norm.weight"])
        # Each rank's KV heads: 8 / size.
        attention = model.model.layers[0].self_attn
        assert attention.num_kv_heads == config.num_key_value_heads // size
        assert attention.num_heads == config.num_attention_heads // size
        assert attention.head_dim == head_dim(config)


class _CountingSlice:
    def __init__(self, inner, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        tensor = self.inner[index]
        self.counter[0] += tensor.numel()
        return tensor


class _CountingFile:
    """safe_open that counts the elements each load actually reads."""

    def __init__(self, counter: list[int], *args, **kwargs) -> None:
        self.file = safe_open(*args, **kwargs)
        self.counter = counter

    def __enter__(self):
        self.inner = self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        return _CountingSlice(self.inner.get_slice(name), self.counter)

    def get_tensor(self, name):
        raise AssertionError(f"{name} was read whole; ranks read slices")


def test_ranks_read_only_their_slices(checkpoint, monkeypatch):
    model_dir, full = checkpoint
    total = sum(t.numel() for t in full.values())
    replicated = sum(t.numel() for name, t in full.items()
                     if name.endswith(("norm.weight", "o_proj.bias", "down_proj.bias")))
    for size in (2, 4):
        read_by_rank = []
        for rank in range(size):
            counter = [0]
            monkeypatch.setattr(checkpoint_files, "safe_open",
                                lambda *a, counter=counter, **k: _CountingFile(counter, *a, **k))
            _build(model_dir, rank, size)
            read_by_rank.append(counter[0])
        # Sharded tensors are read once over all ranks; replicated ones by every rank.
        assert sum(read_by_rank) == total + (size - 1) * replicated
        assert max(read_by_rank) < total / size + replicated + 2 * full["lm_head.weight"].shape[1]


def test_dummy_weights_are_created_in_the_target_dtype(checkpoint, monkeypatch):
    """load_format="dummy" never builds a float32 copy: every parameter is created
    in bfloat16, on the target device, and the default dtype is restored after."""
    from transformers import AutoConfig

    model_dir, _ = checkpoint
    created = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty",
                        lambda *a, **k: created.append(empty(*a, **k)) or created[-1])
    config = AutoConfig.from_pretrained(model_dir)
    model = build_model(config, model_dir, max_position=64, dtype=torch.bfloat16,
                        device=torch.device("cpu"), load_format="dummy", pack_cpu_weights=False)
    assert torch.get_default_dtype() == torch.float32
    assert created and {t.dtype for t in created} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.abs().sum() > 0 for p in model.parameters())  # every one was drawn


def test_rotary_table_is_float32_math_whatever_the_default_dtype():
    """The Llama 3 table built while parameters are made in bfloat16 equals the float32 one."""
    from transformers import LlamaConfig

    from pagedserve.worker.layers import default_dtype
    from pagedserve.worker.layers.rotary import RotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))
    plain = RotaryEmbedding(config, 16, 128)
    with default_dtype(torch.bfloat16):
        built = RotaryEmbedding(config, 16, 128)
    assert built.cos.dtype == torch.float32
    assert torch.equal(built.cos, plain.cos) and torch.equal(built.sin, plain.sin)
