"""LoRAStack (worker/layers/lora.py) on our parallel layers against `peft`: a batch mixing
base tokens and three adapters of different ranks and targets, at TP 1 and 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.lora_request import read_adapter_config
from pagedserve.model.shape import head_dim
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.worker.layers.lora import PARTS, LoRABatch, LoRAStack
from pagedserve.worker.lora_weights import load_lora_weights

peft = pytest.importorskip("peft")
ADAPTERS = [  # (rank, targets): different ranks, some parts of a fused layer only
    (4, ["q_proj", "v_proj"]),
    (8, ["q_proj", "k_proj", "o_proj", "down_proj"]),
    (2, ["gate_proj", "up_proj", "down_proj"]),
]
MAX_RANK = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """peft models (the oracle) and our reading of the same files."""
    from transformers import AutoModelForCausalLM

    made = []
    for index, (rank, targets) in enumerate(ADAPTERS):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=rank, lora_alpha=2 * rank + index, target_modules=targets,
            init_lora_weights=False))
        path = tmp_path_factory.mktemp("adapters") / str(index)
        model.save_pretrained(path)
        spec = read_adapter_config(path, MAX_RANK)
        made.append((model, load_lora_weights(spec, model.config)))
    return made


def _layers(config, tp: TPGroup) -> dict[str, torch.nn.Module]:
    size = head_dim(config)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    inter, hidden = config.intermediate_size, config.hidden_size
    return {"qkv_proj": QKVParallelLinear(hidden, size, heads, kv, False, tp),
            "o_proj": RowParallelLinear(heads * size, hidden, False, tp),
            "gate_up_proj": ColumnParallelLinear(hidden, [inter, inter], False, tp),
            "down_proj": RowParallelLinear(inter, hidden, False, tp)}


def _load(layers, hf_layer) -> None:
    attention, mlp = hf_layer.self_attn, hf_layer.mlp
    for name, (ours, part) in PARTS.items():
        module = getattr(attention if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                         else mlp, name)
        weight = getattr(module, "base_layer", module).weight.detach()
        layers[ours].weight.weight_loader(layers[ours].weight, weight, part)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_mixed_batch_equals_each_adapter_in_peft(adapters, tp_size):
    config = adapters[0][0].config
    layer_index = 1
    torch.manual_seed(5)
    slots = torch.tensor([-1, 0, 1, 2, 1, -1, 2, 0, 0, 1, 2, -1])
    batch = LoRABatch()
    batch.set(slots.numpy(), torch.device("cpu"))
    inputs = {"qkv_proj": torch.randn(len(slots), config.hidden_size),
              "gate_up_proj": torch.randn(len(slots), config.hidden_size),
              "o_proj": torch.randn(len(slots), config.num_attention_heads * head_dim(config)),
              "down_proj": torch.randn(len(slots), config.intermediate_size)}
    hf_layer = adapters[0][0].base_model.model.model.layers[layer_index]
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in inputs}
    for rank in range(tp_size):
        tp = TPGroup(rank=rank, size=tp_size)
        layers = _layers(config, tp)
        _load(layers, hf_layer)
        stacks = {name: LoRAStack(layer, max_loras=len(adapters), max_rank=MAX_RANK)
                  for name, layer in layers.items()}
        for slot, (_, weights) in enumerate(adapters):
            per_layer: dict[str, dict[int, tuple]] = {}
            for (index, module), pair in weights.pairs.items():
                if index == layer_index:
                    ours, part = PARTS[module]
                    per_layer.setdefault(ours, {})[part] = pair
            for name, stack in stacks.items():
                stack.set(slot, per_layer.get(name, {}), weights.spec.scaling)
        for name, layer in layers.items():
            x = inputs[name]
            if isinstance(layer, RowParallelLinear):  # this rank's input columns
                x = x[:, rank * layer.part_size:(rank + 1) * layer.part_size]
            out = F.linear(x, layer.weight)  # before any all-reduce
            stacks[name].apply(x, out, batch)
            outputs[name].append(out)
    for name, parts in outputs.items():
        layer = _layers(config, TPGroup())[name]
        if isinstance(layer, RowParallelLinear):
            ours = sum(parts)  # what the all-reduce makes of the partial sums
        else:  # each part's rows from every rank, side by side
            sizes = [size // tp_size for size in layer.full_sizes]
            ours = torch.cat([torch.cat([p.split(sizes, dim=1)[i] for p in parts], dim=1)
                              for i in range(len(sizes))], dim=1)
        expected = torch.stack([_peft_row(adapters, layer_index, name, int(slot), inputs[name][t])
                                for t, slot in enumerate(slots)])
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _peft_row(adapters, layer_index: int, ours: str, slot: int, x: torch.Tensor) -> torch.Tensor:
    """peft's output of our fused layer `ours` for one token under adapter `slot` (-1: base)."""
    model = adapters[max(slot, 0)][0]
    hf_layer = model.base_model.model.model.layers[layer_index]
    outputs = []
    for name, (fused, _) in PARTS.items():
        if fused != ours:
            continue
        owner = hf_layer.self_attn if fused in ("qkv_proj", "o_proj") else hf_layer.mlp
        module = getattr(owner, name)
        with torch.no_grad():
            adapted = slot >= 0 and hasattr(module, "base_layer")
            outputs.append(module(x[None])[0] if adapted
                           else getattr(module, "base_layer", module)(x[None])[0])
    return torch.cat(outputs)
