"""Where a Ray rank gets its weights: the model's files on its own node, or the
checkpoint through Ray's object store (model.weights_transfer)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from pagedserve.model.checkpoint_files import hub_snapshot, read_checkpoint
from pagedserve.model.info import ModelInfo
from pagedserve.worker.ray_utils import node_here


def model_files_here(info: ModelInfo, rank: int) -> ModelInfo:
    """`info` with model files that exist on this rank's node.

    model_dir (and the GGUF file) are paths on the node that resolved the model.
    A hub id is resolved again here, through this node's hub cache; any other path
    must exist on every node, or the rank fails with the node, the path and the
    remedy named.
    """
    needed = [path for path in (info.model_dir, info.gguf_file) if path is not None]
    if all(path.exists() for path in needed):
        return info
    node, address = node_here()
    where = f"tensor-parallel rank {rank} runs on node {node} ({address})"
    if info.hub_id is not None:
        try:
            directory = hub_snapshot(info.hub_id)
        except Exception as error:  # the hub's errors are many; all end here
            raise FileNotFoundError(
                f"{where}, which could not resolve the hub id {info.hub_id!r} through its hub "
                f"cache ({type(error).__name__}: {str(error).splitlines()[0]}): let that node "
                "reach the hub, or fill its hub cache (HF_HOME) with the model") from error
        return dataclasses.replace(info, model_dir=directory)
    missing = next(path for path in needed if not path.exists())
    raise FileNotFoundError(
        f"{where}, where the model's {missing} does not exist (it does on the node that "
        "started the engine): put the model on a filesystem that every node mounts at the "
        "same path, or give model.path as a hub id, which each node resolves through its "
        "own hub cache")


def checkpoint_for_store(info: ModelInfo) -> dict[str, tuple[np.ndarray, str, tuple[int, ...]]]:
    """The model's checkpoint (its safetensors or .bin files, model/checkpoint_files.py), read
    once here, as raw bytes for Ray's object store.

    Numpy arrays are read from the store without a copy, by every rank of a node
    (torch tensors would be unpickled into each rank's memory): each tensor
    travels as its bytes, its dtype's name and its shape.
    """
    if info.gguf_file is not None:
        raise ValueError("model.weights_transfer='object_store' ships HF checkpoints "
                         f"(safetensors or .bin files); {info.gguf_file.name} is a GGUF file: "
                         "use weights_transfer 'files'")
    return {name: (tensor.contiguous().view(-1).view(torch.uint8).numpy(),
                   str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            for name, tensor in read_checkpoint(info.model_dir).items()}


def stored_checkpoint(stored: dict[str, tuple[np.ndarray, str, tuple[int, ...]]]
                      ) -> dict[str, torch.Tensor]:
    """checkpoint_for_store's tensors again, as views of the store's read-only memory
    (the weight loaders copy out only this rank's slices)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(data).view(getattr(torch, dtype)).view(shape)
                for name, (data, dtype, shape) in stored.items()}
