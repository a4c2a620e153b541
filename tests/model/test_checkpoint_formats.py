"""Checkpoints as the Hugging Face hub ships them load, and equal transformers.

- Sharded safetensors with `model.safetensors.index.json`, beside a
  `consolidated.safetensors` under Mistral's own tensor names (as
  Mistral-7B-Instruct-v0.3 ships): only the files the index names are read.
- PyTorch `.bin` shards with `pytorch_model.bin.index.json` (as older
  fine-tunes ship): read through the same per-parameter weight loaders.
- Safetensors win when both are there; a directory with neither is refused.
- From a hub id, only the files that are read are downloaded.
"""

from __future__ import annotations

import fnmatch
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.model.checkpoint_files import (
    checkpoint_bytes,
    hub_snapshot,
    read_checkpoint,
    weight_files,
)
from pagedserve.testing import build_random_model
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.models import build_model
from pagedserve.worker.rank_weights import checkpoint_for_store, stored_checkpoint

SHARD_SIZE = "150KB"  # the tiny model is ~600 KB: several shards
MAX_TOKENS = 12
ENGINE = dict(block_size=8, max_model_len=64, dtype="float32", device="cpu", num_gpu_blocks=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A single-file safetensors Mistral: the weights every variant below holds."""
    return build_random_model(tmp_path_factory.mktemp("formats") / "base", arch="mistral",
                              num_key_value_heads=2)


def _without_weights(base: Path, out: Path) -> Path:
    """Config, generation config and tokenizer of `base` in `out`, no weights."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin",
                                                             "*.index.json"))
    return out


def _mistral_names(config, out: Path) -> None:
    """consolidated.safetensors as Mistral ships it: Mistral's names, and here other values."""
    generator = torch.Generator().manual_seed(1)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    shapes = {"tok_embeddings.weight": (config.vocab_size, hidden), "norm.weight": (hidden,),
              "output.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        ours = f"layers.{layer}."
        shapes.update({ours + "attention.wq.weight": (hidden, hidden),
                       ours + "attention.wk.weight": (kv, hidden),
                       ours + "attention.wv.weight": (kv, hidden),
                       ours + "attention.wo.weight": (hidden, hidden),
                       ours + "feed_forward.w1.weight": (inter, hidden),
                       ours + "feed_forward.w2.weight": (hidden, inter),
                       ours + "feed_forward.w3.weight": (inter, hidden),
                       ours + "attention_norm.weight": (hidden,),
                       ours + "ffn_norm.weight": (hidden,)})
    save_file({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()},
              str(out / "consolidated.safetensors"))


@pytest.fixture(scope="module")
def sharded_with_consolidated(base, tmp_path_factory) -> Path:
    out = _without_weights(base, tmp_path_factory.mktemp("formats") / "sharded")
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(
        out, max_shard_size=SHARD_SIZE)
    _mistral_names(AutoConfig.from_pretrained(base), out)
    return out


@pytest.fixture(scope="module")
def sharded_bin(base, tmp_path_factory) -> Path:
    """pytorch_model-0000i-of-0000n.bin and pytorch_model.bin.index.json, as transformers
    wrote them before safetensors (transformers 5 saves safetensors only)."""
    out = _without_weights(base, tmp_path_factory.mktemp("formats") / "bin")
    state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    save_torch_state_dict(state, out, safe_serialization=False, max_shard_size=SHARD_SIZE)
    return out


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(6, vocab_size) for _ in range(n)] for n in (1, 5, 17, 30)]


def _hf_greedy(model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                               do_sample=False)[0, len(p):].tolist()
                for p in _prompts(model.config.vocab_size)]


def _greedy(model: Path | str) -> list[list[int]]:
    """A directory's, or a hub id's, greedy tokens."""
    llm = LLM(str(model), **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts(llm.engine.info.vocab_size)],
                           params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def _rank_params(model_dir: Path, rank: int, size: int) -> dict[str, torch.Tensor]:
    model = build_model(AutoConfig.from_pretrained(model_dir), model_dir, max_position=64,
                        dtype=torch.float32, device=torch.device("cpu"),
                        load_format="safetensors", tp=TPGroup(rank, size),
                        pack_cpu_weights=False)
    return dict(model.named_parameters())


@pytest.mark.parametrize("layout", ["sharded_with_consolidated", "sharded_bin"])
def test_hub_layouts_equal_hf_greedy(layout, request):
    model_dir = request.getfixturevalue(layout)
    assert len(weight_files(model_dir)) > 1  # sharded, read through the index
    assert _greedy(model_dir) == _hf_greedy(model_dir)


def test_only_the_index_files_are_read(base, sharded_with_consolidated, sharded_bin):
    expected = load_file(base / "model.safetensors")
    for model_dir, suffix in ((sharded_with_consolidated, ".safetensors"), (sharded_bin, ".bin")):
        files = weight_files(model_dir)
        assert {file.suffix for file in files} == {suffix}
        assert "consolidated.safetensors" not in {file.name for file in files}
        tensors = read_checkpoint(model_dir)
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[name], expected[name]) for name in expected)
        # The object store's copy, as each rank reads it back.
        stored = stored_checkpoint(checkpoint_for_store(
            SimpleNamespace(gguf_file=None, model_dir=model_dir)))
        assert stored.keys() == expected.keys()
        assert all(torch.equal(stored[name], expected[name]) for name in expected)
        assert checkpoint_bytes(model_dir) == sum(file.stat().st_size for file in files)
    assert checkpoint_bytes(sharded_with_consolidated) < sum(
        file.stat().st_size for file in sharded_with_consolidated.glob("*.safetensors"))


@pytest.mark.parametrize("layout", ["sharded_with_consolidated", "sharded_bin"])
def test_each_tensor_parallel_rank_loads_its_slice(base, layout, request):
    """Each of 2 ranks holds what it holds from the single-file checkpoint (whose slices
    test_tp_loading.py checks tensor by tensor)."""
    model_dir = request.getfixturevalue(layout)
    for rank in range(2):
        ours, single = _rank_params(model_dir, rank, 2), _rank_params(base, rank, 2)
        assert ours.keys() == single.keys()
        for name, param in single.items():
            assert torch.equal(ours[name], param), name


def test_safetensors_win_over_bin(base, tmp_path):
    """As in transformers: with both formats present, the .bin files are not read
    (here they hold zeros)."""
    model_dir = _without_weights(base, tmp_path / "both")
    expected = load_file(base / "model.safetensors")
    save_torch_state_dict({name: torch.zeros_like(t) for name, t in expected.items()},
                          model_dir, safe_serialization=False, max_shard_size=SHARD_SIZE)
    shutil.copy(base / "model.safetensors", model_dir)
    assert weight_files(model_dir) == [model_dir / "model.safetensors"]
    params = _rank_params(model_dir, 0, 1)
    assert torch.equal(params["model.norm.weight"], expected["model.norm.weight"])
    assert torch.equal(params["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])


def test_a_directory_without_weights_names_both_formats(base, tmp_path):
    model_dir = _without_weights(base, tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as error:
        _rank_params(model_dir, 0, 1)
    message = str(error.value)
    assert str(model_dir) in message
    assert "*.safetensors" in message and "pytorch_model*.bin" in message


def test_an_index_naming_a_missing_shard_is_refused(sharded_bin, tmp_path):
    model_dir = _without_weights(sharded_bin, tmp_path / "partial")
    first, *rest = sorted(sharded_bin.glob("pytorch_model-*.bin"))
    for file in [sharded_bin / "pytorch_model.bin.index.json", *rest]:
        shutil.copy(file, model_dir)
    with pytest.raises(FileNotFoundError, match=first.name):
        weight_files(model_dir)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download against repositories in local directories: it copies the files
    that match allow_patterns into the repository's snapshot, as the hub client does."""
    repos: dict[str, Path] = {}

    def snapshot_download(repo_id, allow_patterns, **_):
        snapshot = tmp_path / "hub" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos


def test_a_hub_id_downloads_only_the_files_that_are_read(
        fake_hub, base, sharded_with_consolidated, sharded_bin, tmp_path):
    both = shutil.copytree(sharded_with_consolidated, tmp_path / "both")
    for file in sharded_bin.glob("*.bin*"):
        shutil.copy(file, both)
    fake_hub.update({"mistralai/like-v0.3": sharded_with_consolidated,
                     "someone/bin-fine-tune": sharded_bin, "someone/both": both})
    for repo_id, suffix in (("mistralai/like-v0.3", ".safetensors"),
                            ("someone/bin-fine-tune", ".bin"), ("someone/both", ".safetensors")):
        snapshot = hub_snapshot(repo_id)
        weights = {file.name for file in snapshot.iterdir()
                   if file.suffix in (".safetensors", ".bin")}
        assert weights == {file.name for file in weight_files(fake_hub[repo_id])}, repo_id
        assert {Path(name).suffix for name in weights} == {suffix}
        assert (snapshot / "tokenizer.json").is_file() and (snapshot / "config.json").is_file()
    assert _greedy("someone/bin-fine-tune") == _hf_greedy(sharded_bin)
