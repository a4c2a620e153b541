"""How closely an engine scores prompts as transformers does: the accuracy bounds of a
weight-only quantized model (mean absolute logprob difference, top-1 agreement)."""

from __future__ import annotations

import torch

from pagedserve import LLM, SamplingParams


def prompt_scores(llm: LLM, hf, prompts: list[list[int]]) -> tuple[float, float]:
    """(mean |logprob difference|, share of positions whose top token agrees), over every
    scored position of `prompts`: the engine's prompt logprobs against `hf`'s."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    differences, agree = [], []
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.inference_mode():
            reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        for i in range(1, len(prompt)):
            scored = output.prompt_logprobs[i]  # the prompt token and the top one
            differences.append(abs(scored[prompt[i]] - reference[i - 1, prompt[i]].item()))
            agree.append(max(scored, key=scored.get) == reference[i - 1].argmax().item())
    return sum(differences) / len(differences), sum(agree) / len(agree)
