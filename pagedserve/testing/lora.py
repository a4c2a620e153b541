"""Random LoRA adapters in PEFT's format, for tests and benchmarks (needs `peft`).

    build_lora_adapter(base_dir, out_dir, rank=8, target_modules=["q_proj", "v_proj"])

B is random, not zero (`init_lora_weights=False`), so the adapter changes
what the model generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_lora_adapter(base_dir: str | Path, out_dir: str | Path, rank: int,
                       target_modules: list[str] | str, seed: int = 0,
                       lora_alpha: float | None = None, **options: Any) -> Path:
    """Save a random adapter for the HF model at `base_dir` into `out_dir`."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * rank,
        target_modules=target_modules, init_lora_weights=False, **options))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir: str | Path, adapter_dir: str | Path | None, prompts: list[list[int]],
                max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from HF transformers (+ peft, given an adapter): the oracle."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                 do_sample=False)
            results.append(out[0, len(prompt):].tolist())
    return results


def write_random_adapter(hf_config, out_dir: str | Path, rank: int, target_modules: list[str],
                         seed: int = 0, lora_alpha: float | None = None,
                         std: float = 0.02) -> Path:
    """Write a random adapter in PEFT's format without building a model: for a base
    whose weights cannot be saved as an HF directory (a GGUF file), or many adapters."""
    import json

    import torch
    from safetensors.torch import save_file

    from pagedserve.worker.lora_weights import projection_shapes

    generator = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(hf_config)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module in target_modules:
            in_features, out_features = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features,
                                                             generator=generator) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank,
                                                             generator=generator) * std
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": lora_alpha if lora_alpha is not None else 2 * rank,
        "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": None}))
    return out_dir
