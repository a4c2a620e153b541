"""The benchmarks' shared random models and request mixes: the ~56M-parameter
Llama-shaped body (and its Mixtral-shaped variant) that throughput.py, prefix.py,
gpu_e2e.py and weights_transfer.py build, and the vLLM paper's memory-study
scenarios, whose prompt lengths throughput.py scales down.

Run, it prints what a scenario holds at a scale:

    python benchmarks/workloads.py [--scenario mixed] [--scale 16]
"""

from __future__ import annotations

import argparse
import random

# (count, min prompt, max prompt) per part, before scaling.
SCENARIOS = {
    "short-chat": [(200, 20, 500)],
    "medium": [(200, 50, 2000)],
    "long-document": [(100, 200, 8000)],
    "mixed": [(30, 10, 200), (30, 200, 2000), (20, 1000, 6000)],
}
MODEL = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=8704)
# The same body with Mixtral's MLP: 8 experts of Llama's MLP each, 2 per token (`--arch
# mixtral`): a step reads up to 8x the MLP weights and computes 2x the MLP FLOPs.
ARCHS = {"llama": ("bench-llama-50m", MODEL),
         "mixtral": ("bench-mixtral-8x", dict(MODEL, num_local_experts=8, num_experts_per_tok=2,
                                              sliding_window=None))}
FIRST_TOKEN = 6  # ids 0..5 are the tokenizer's special tokens (BOS, EOS, PAD, ...)


def random_tokens(rng: random.Random, count: int) -> list[int]:
    """`count` token ids of MODEL's vocabulary, none of them special."""
    return [rng.randrange(FIRST_TOKEN, MODEL["vocab_size"]) for _ in range(count)]


def workload(name: str, args) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request of a scenario, in arrival order;
    seeded. `args`: scale, requests_scale, output_min, output_max, seed."""
    rng = random.Random(f"{name}-{args.seed}")
    lengths = [(rng.randint(max(1, round(lo / args.scale)), max(1, round(hi / args.scale))),
                rng.randint(args.output_min, args.output_max))
               for count, lo, hi in SCENARIOS[name]
               for _ in range(max(1, round(count * args.requests_scale)))]
    rng.shuffle(lengths)  # mixed: the three kinds arrive interleaved
    return [(random_tokens(rng, p), o) for p, o in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=list(SCENARIOS), default="mixed")
    parser.add_argument("--scale", type=float, default=16.0, help="divide prompt lengths by this")
    parser.add_argument("--requests-scale", type=float, default=1.0)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    requests = workload(args.scenario, args)
    prompts = [len(prompt) for prompt, _ in requests]
    print(f"{args.scenario}: {len(requests)} requests, {sum(prompts)} prompt tokens "
          f"(longest {max(prompts)}), {sum(o for _, o in requests)} output tokens")


if __name__ == "__main__":
    main()
