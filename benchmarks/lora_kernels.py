"""The LoRA kernels on a GPU: time and bandwidth of one layer's adapters against its base GEMM.

Llama-3-8B's qkv projection (4096 -> 6144), bf16, `--slots` adapters of rank
`--rank` in the stacked slots, each token's adapter drawn at random:

* decode: `--decode-tokens` tokens, one per sequence (BGMV: one program per
  token); prefill: `--prefill-tokens` tokens sorted by adapter into runs
  (SGMV: tiles of one run at a time);
* kernel time: shrink (x A^T for q, k and v at once) plus the three expands,
  the median of `--iters` runs timed with CUDA events, next to the base GEMM
  `x W^T` of the same tokens; the overhead is their ratio;
* bandwidth: bytes the adapters' A and B rows read (once per token for BGMV,
  once per tile for SGMV), plus x, h and y, over the time, against a
  device-to-device copy measured in the same run.

Every kernel's output is checked against the torch reference before it is timed.

    python benchmarks/lora_kernels.py                 # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/lora_kernels.py --smoke   # CPU: the script
        with tiny shapes in Triton's interpreter; its times mean nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_kernels import copy_bandwidth, median_ms

from pagedserve.kernels import lora, reference
from pagedserve.worker.layers.lora import LoRABatch


def bench(args, num_tokens: int, segmented: bool, device: torch.device, copy_bw: float) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(num_tokens)
    dtype, hidden, parts = torch.bfloat16, args.hidden, args.parts
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    weight = (torch.randn(sum(parts), hidden, generator=gen) / hidden ** 0.5).to(dtype).to(device)
    a = (torch.randn(args.slots, len(parts) * args.rank, hidden, generator=gen)
         / hidden ** 0.5).to(dtype).to(device)
    b = [torch.randn(args.slots, size, args.rank, generator=gen).to(dtype).to(device) / 16
         for size in parts]
    scaling = torch.full((args.slots,), 2.0, device=device)
    token_slots = torch.randint(0, args.slots, (num_tokens,), generator=gen)
    if segmented:
        token_slots = token_slots.sort().values
    batch = LoRABatch()
    batch.set(token_slots.numpy().astype("int32"), torch.device("cpu"))
    slots = token_slots.to(torch.int32).to(device)
    segments = tuple(torch.tensor(column, dtype=torch.int32, device=device) for column in zip(
        *[(start, end - start, slot) for slot, start, end in batch.segments], strict=True))
    out = F.linear(x, weight)

    def run() -> torch.Tensor:
        y = out.clone()
        if segmented:
            h = lora.sgmv_shrink(x, a, segments, batch.max_length, scaling)
        else:
            h = lora.lora_shrink(x, a, slots, scaling)
        offset = 0
        for part, size in enumerate(parts):
            target, hp = y[:, offset:offset + size], h[:, part * args.rank:(part + 1) * args.rank]
            if segmented:
                lora.sgmv_expand(target, hp, b[part], segments, batch.max_length)
            else:
                lora.lora_expand(target, hp, b[part], slots)
            offset += size
        return y

    expected = out.clone().float()
    h = reference.lora_shrink(x, a, slots, scaling)
    offset = 0
    for part, size in enumerate(parts):
        delta = torch.zeros(num_tokens, size, device=device)
        reference.lora_expand(delta, h[:, part * args.rank:(part + 1) * args.rank].contiguous(),
                              b[part].float(), slots)
        expected[:, offset:offset + size] += delta
        offset += size
    torch.testing.assert_close(run().float(), expected, atol=0.1, rtol=0.05)
    lora_ms = median_ms(run, args.iters, device)
    base_ms = median_ms(lambda: F.linear(x, weight), args.iters, device)
    element = x.element_size()
    weight_rows = (len(parts) * args.rank * hidden + sum(parts) * args.rank) * element
    reads = len(batch.segments) if segmented else num_tokens  # adapter reads: per run, per token
    moved = (reads * weight_rows + num_tokens * (hidden + 2 * sum(parts)) * element
             + num_tokens * len(parts) * args.rank * 4 * 2)
    return {"tokens": num_tokens, "kernel": "sgmv" if segmented else "bgmv",
            "segments": len(batch.segments), "lora_ms": lora_ms, "base_ms": base_ms,
            "overhead": lora_ms / base_ms, "bandwidth": moved / (lora_ms / 1e3),
            "bandwidth_fraction": moved / (lora_ms / 1e3) / copy_bw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--parts", type=int, nargs="+", default=[4096, 1024, 1024])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, a few iterations: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_kernels.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.hidden, args.parts, args.rank, args.slots = 64, [64, 32, 32], 8, 3
        args.decode_tokens, args.prefill_tokens, args.iters = [5], [40], 2
    elif device.type != "cuda":
        parser.error("no CUDA device: run on a GPU, or pass --smoke (with TRITON_INTERPRET=1)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"
    copy_bw = copy_bandwidth(device, 2**30 if not args.smoke else 2**20, args.iters)
    print(f"{name}: device-to-device copy {copy_bw / 1e9:.0f} GB/s; qkv {args.hidden} -> "
          f"{sum(args.parts)}, {args.slots} adapters of rank {args.rank}, bf16")
    print("| tokens | kernel | runs | LoRA us | base GEMM us | LoRA / base | GB/s | of copy BW |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for num_tokens, segmented in ([(t, False) for t in args.decode_tokens]
                                  + [(t, True) for t in args.prefill_tokens]):
        r = bench(args, num_tokens, segmented, device, copy_bw)
        rows.append(r)
        print(f"| {num_tokens} | {r['kernel']} | {r['segments']} | {r['lora_ms'] * 1e3:.1f} | "
              f"{r['base_ms'] * 1e3:.1f} | {r['overhead']:.2f} | {r['bandwidth'] / 1e9:.0f} | "
              f"{r['bandwidth_fraction']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=name, date=datetime.date.today().isoformat(),
                                        smoke=args.smoke, copy_bandwidth=copy_bw, rows=rows),
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
