"""Which files of an HF model directory hold its weights, and their tensors.

As transformers chooses: safetensors files when there are any, else PyTorch
`pytorch_model*.bin` files. A sharded checkpoint's index
(`model.safetensors.index.json`, `pytorch_model.bin.index.json`) names its
files in its `weight_map`, and then only those are read: a hub checkout may
hold other weights beside them, such as Mistral's `consolidated.safetensors`
under Mistral's own tensor names.

Every reader of the checkpoint (the loader, each tensor-parallel rank, the
object store's copy, what sums its size) takes its file list from
`weight_files`, and `hub_snapshot` downloads from the hub just those files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# (index file, files read when there is no index), in transformers' order of preference.
FORMATS = (("model.safetensors.index.json", "*.safetensors"),
           ("pytorch_model.bin.index.json", "pytorch_model*.bin"))
# What the engine takes from a hub snapshot besides the weights: config, tokenizer,
# chat template and the checkpoint's index.
HUB_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: the first format present, only its index's files if indexed."""
    for index_name, pattern in FORMATS:
        files = _indexed(model_dir / index_name) or sorted(model_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"no checkpoint in {model_dir}: expected safetensors files (*.safetensors, with "
        "model.safetensors.index.json when sharded) or PyTorch files (pytorch_model*.bin, "
        "with pytorch_model.bin.index.json when sharded)")


def _indexed(index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names; none when there is no index."""
    if not index.is_file():
        return []
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names {', '.join(missing)}, which "
                                f"{'is' if len(missing) == 1 else 'are'} not in {index.parent}")
    return files


def hub_snapshot(hub_id: str) -> Path:
    """A snapshot of `hub_id` in the hub cache, with the files `weight_files` reads there
    and no other weights: a Mistral repository's consolidated.safetensors beside its
    indexed shards, or .bin copies of safetensors weights, stay on the hub."""
    from huggingface_hub import snapshot_download

    directory = Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    for index_name, pattern in FORMATS:
        index = directory / index_name
        wanted = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                  if index.is_file() else [pattern])
        directory = Path(snapshot_download(hub_id, allow_patterns=wanted))
        if any(directory.glob(pattern)):
            break
    return directory


def checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) of every checkpoint tensor, read lazily.

    Safetensors tensors come as slices: nothing is read until indexed. A .bin
    file is memory-mapped (`mmap=True`), so indexing a tensor reads only the
    pages of that slice; `weights_only=True` unpickles tensors and plain
    containers only, never code.
    """
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        else:
            yield from _load_bin(file).items()


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor, read whole (for the object store)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        tensors.update(load_file(file) if file.suffix == ".safetensors" else _load_bin(file))
    return tensors


def checkpoint_bytes(model_dir: Path) -> int:
    """The size of the checkpoint's files."""
    return sum(file.stat().st_size for file in weight_files(model_dir))


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
