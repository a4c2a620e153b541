"""Tests for pagedserve.testing: tiny random-weight HF models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import pagedserve.model.random_model as rm
from pagedserve.testing import build_random_model, cached_random_model

ARCH_CASES = {
    "llama": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 1}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module", params=list(ARCH_CASES))
def built(request, tmp_path_factory) -> tuple[str, dict, Path]:
    arch, overrides = ARCH_CASES[request.param]
    path = build_random_model(tmp_path_factory.mktemp(request.param) / "model", arch, **overrides)
    return arch, overrides, path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_files_and_config(built):
    arch, overrides, path = built
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.num_key_value_heads == overrides.get("num_key_value_heads", 4)
    assert (cfg.intermediate_size, cfg.max_position_embeddings) == (128, 1024)
    assert cfg.initializer_range == 0.1 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == 512
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    if arch == "mistral":
        assert cfg.sliding_window is None
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, [1, 5])  # end of text, end of turn

    weights = _weights(path)
    assert all(t.dtype == torch.float32 for t in weights.values())
    q_bias = "model.layers.0.self_attn.q_proj.bias"
    assert (q_bias in weights) == (arch == "qwen2")
    k_proj = weights["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape == (16 * cfg.num_key_value_heads, 64)  # head_dim = 64 / 4


def test_model_loads_and_runs(built):
    _, _, path = built
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("The weather is cold and clear.").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # initializer_range=0.1 is meant to keep greedy argmax away from near-ties.
    top2 = logits[0, -1].topk(2).values
    assert (top2[0] - top2[1]).item() > 1e-3


def test_tokenizer(built):
    _, _, path = built
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert [tok.convert_tokens_to_ids(t) for t in rm.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert len(tok) == 512  # nothing added on load (e.g. an unk token outside the vocab)
    for text in ("Hello world, how are you?", "naïve café ☕", "def f(x):\n    return x * 2"):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert ids == raw.encode(text).ids  # AutoTokenizer == tokenizer.json
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text


def test_chat_template(built):
    _, _, path = built
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header|>system<|end_header|>\n\nBe brief.<|eot|>"
        "<|start_header|>user<|end_header|>\n\nhi<|eot|>"
        "<|start_header|>assistant<|end_header|>\n\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids.count(5) == 2  # 5 = <|eot|>


def test_deterministic_weights(tmp_path):
    a = _weights(build_random_model(tmp_path / "a", seed=3))
    b = _weights(build_random_model(tmp_path / "b", seed=3))
    c = _weights(build_random_model(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert ((tmp_path / "a" / "tokenizer.json").read_bytes()
            == (tmp_path / "c" / "tokenizer.json").read_bytes())


def test_rope_parameters_pass_through(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    path = build_random_model(tmp_path / "m", rope_parameters=rope, hidden_size=32)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.rope_parameters == rope and cfg.hidden_size == 32
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.isfinite(model(torch.tensor([[0, 10, 20]])).logits).all()


def test_vocab_size(tmp_path):
    big = build_random_model(tmp_path / "big", vocab_size=600)
    assert AutoConfig.from_pretrained(big).vocab_size == 600
    assert len(AutoTokenizer.from_pretrained(big)) == 512  # embedding padded past tokenizer
    small = build_random_model(tmp_path / "small", vocab_size=300)
    assert AutoConfig.from_pretrained(small).vocab_size == 300
    assert len(AutoTokenizer.from_pretrained(small)) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_random_model(tmp_path / "tiny", vocab_size=100)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="arch") as exc:
        build_random_model(tmp_path / "x", arch="gpt9")
    assert "gpt9" in str(exc.value) and "qwen2" in str(exc.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_random_model(tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert (build_random_model(tmp_path / "empty") / "config.json").is_file()


def test_cached_random_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    first = cached_random_model("tiny", num_key_value_heads=2)
    assert first.parent == tmp_path / "models" and first.name.startswith("tiny-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(rm, "build_random_model", no_build)
    assert cached_random_model("tiny", num_key_value_heads=2) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # Every input that changes the model changes the directory.
    monkeypatch.undo()
    other = cached_random_model("tiny", cache_dir=tmp_path / "c", seed=1)
    assert other.parent == tmp_path / "c" / "models"
    assert other.name != first.name
    assert cached_random_model("tiny", cache_dir=tmp_path / "c", seed=1) == other


def test_cached_random_model_lost_race(tmp_path, monkeypatch):
    """Another process renames its copy into place first: ours is discarded."""
    real_rename = os.rename

    def racing_rename(src, dst):
        shutil.copytree(src, dst)  # the "other process" wins
        (Path(dst) / "winner").write_text("")
        real_rename(src, dst)

    monkeypatch.setattr(rm.os, "rename", racing_rename)
    path = cached_random_model(cache_dir=tmp_path)
    assert (path / "winner").exists() and (path / "config.json").is_file()
    assert os.listdir(tmp_path / "models") == [path.name]  # temp dir cleaned up
