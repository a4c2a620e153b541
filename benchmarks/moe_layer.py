"""One MoE layer's experts on the CPU: the C++ kernel against one oneDNN GEMM pair per
expert, by tokens per step, with the weights cold as in a real step.

Both paths are pagedserve's own (worker/layers/moe.py): `FusedMoE` packed for the
C++ kernel (kernels/cpu_kernels.py's `fused_moe`, what float32 models run), and
the same layer packed for oneDNN, one GEMM pair per expert a token chose (what
other dtypes run, and what float32 ran before the kernel). Each path holds
`--layers` layers of weights, more than the last-level cache, and runs them in
turn, so every layer's weights come from memory, as in a decode step of a whole
model. The paths alternate over `--rounds` rounds; medians are reported.

    python benchmarks/moe_layer.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.moe import FusedMoE

TOKENS = (1, 8, 16, 32, 64, 256, 1024)


def layers(args, kernel: bool) -> list[FusedMoE]:
    """`args.layers` MoE layers of random weights, packed for one path."""
    out = []
    for index in range(args.layers):
        gen = torch.Generator().manual_seed(index)
        layer = FusedMoE(args.experts, args.top_k, args.hidden, args.inter, renormalize=True,
                         tp=TPGroup())
        layer.w13.data.copy_(torch.randn(layer.w13.shape, generator=gen) * 0.02)
        layer.w2.data.copy_(torch.randn(layer.w2.shape, generator=gen) * 0.02)
        assert layer.pack_for_cpu(kernel) and (layer.blocked is not None) == kernel
        out.append(layer)
    return out


def seconds_per_layer(stack: list[FusedMoE], hidden: torch.Tensor, logits: torch.Tensor) -> float:
    for layer in stack:  # warm-up
        layer(hidden, logits)
    start = time.perf_counter()
    for layer in stack:
        layer(hidden, logits)
    return (time.perf_counter() - start) / len(stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12,
                        help="layers of weights per path (12 x 69 MB at the defaults)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1408)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stacks = {"kernel": layers(args, True), "oneDNN": layers(args, False)}
    gen = torch.Generator().manual_seed(0)
    print(f"{args.layers} layers of {args.experts} experts ({args.hidden} x {args.inter}, "
          f"top {args.top_k}), float32, {args.threads} thread(s), medians of {args.rounds}")
    print("| tokens | C++ kernel ms | oneDNN per expert ms | oneDNN / kernel |")
    print("|---|---|---|---|")
    for tokens in TOKENS:
        hidden = torch.randn(tokens, args.hidden, generator=gen)
        logits = torch.randn(tokens, args.experts, generator=gen)
        times: dict[str, list[float]] = {name: [] for name in stacks}
        for round_ in range(args.rounds):
            order = list(stacks) if round_ % 2 == 0 else list(reversed(stacks))
            for name in order:
                times[name].append(seconds_per_layer(stacks[name], hidden, logits))
        kernel, onednn = (statistics.median(times[name]) for name in ("kernel", "oneDNN"))
        print(f"| {tokens} | {kernel * 1e3:.2f} | {onednn * 1e3:.2f} | {onednn / kernel:.2f}x |")


if __name__ == "__main__":
    main()
