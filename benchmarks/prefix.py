"""Prefix caching: requests sharing a long system prompt, with caching on vs off.

Many chat requests start with the same system prompt (`--system-tokens`,
default 1,000) followed by a short distinct user turn (`--suffix-min` ..
`--suffix-max` tokens) and ask for a few output tokens. With prefix caching
the system prompt's full blocks are computed once and every later request
reuses them; without it every request computes them again.

Both runs use the same model (the ~56M-parameter Llama-shaped random model of
throughput.py, float32), the same seeded requests and the same KV pool, one
after the other in one invocation; each warms up outside the timing. Reported:
output tokens/s and requests/s of each, their ratio, the prefix-cache hit rate,
and whether the greedy outputs agree.

    python benchmarks/prefix.py [--requests 64] [--system-tokens 1000] [--threads 1]

With `--config`, a simulated-GPU config (engine.simulator) is served instead:
its steps take the roofline model's time on the GPUs it names, so the figures
are those of that model on those GPUs (the classic comparison's Mixtral-8x7B
row: `--config configs/mixtral-8x7b-tp2-h100-sim.yaml`).

    python benchmarks/prefix.py --config configs/mixtral-8x7b-tp2-h100-sim.yaml
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch
from workloads import FIRST_TOKEN, MODEL, random_tokens

from pagedserve import LLM, SamplingParams
from pagedserve.config import load, parse
from pagedserve.testing import cached_random_model


def requests(args) -> list[list[int]]:
    rng = random.Random(args.seed)
    system = random_tokens(rng, args.system_tokens)
    return [system + random_tokens(rng, rng.randint(args.suffix_min, args.suffix_max))
            for _ in range(args.requests)]


def run(model_dir: str, prompts: list[list[int]], caching: bool, args) -> dict:
    max_model_len = args.system_tokens + args.suffix_max + args.output_tokens
    if args.config is not None:  # a simulated GPU: the config's model, GPUs and pool
        data = load(args.config).model_dump()
        data["engine"]["enable_prefix_caching"] = caching
        llm = LLM(config=parse(data))
    else:
        llm = LLM(model_dir, dtype="float32", device="cpu", block_size=16,
                  enable_prefix_caching=caching, kv_cache_memory_gb=args.kv_cache_gb,
                  max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    # Warm-up on a prompt that shares nothing with the workload.
    llm.generate({"prompt_token_ids": [FIRST_TOKEN] * 64}, params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.get_memory_stats()
    llm.shutdown()
    return dict(caching=caching, seconds=elapsed, output_tokens=tokens,
                tokens_per_s=tokens / elapsed, requests_per_s=len(prompts) / elapsed,
                hit_rate=stats["prefix_cache_hit_rate"],
                token_ids=[o.outputs[0].token_ids for o in outputs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--suffix-min", type=int, default=10)
    parser.add_argument("--suffix-max", type=int, default=60)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None,
                        help="a simulated-GPU config to serve instead of the CPU model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = str(cached_random_model("bench-llama-50m", arch="llama", **MODEL))
    prompts = requests(args)
    off = run(model_dir, prompts, caching=False, args=args)
    on = run(model_dir, prompts, caching=True, args=args)
    same = sum(a == b for a, b in zip(on.pop("token_ids"), off.pop("token_ids"), strict=True))
    ratio = on["tokens_per_s"] / off["tokens_per_s"]
    if args.config is not None:
        print(f"simulated: {args.config}")
    print(f"{args.requests} requests: {args.system_tokens}-token system prompt + "
          f"{args.suffix_min}-{args.suffix_max} token suffix, {args.output_tokens} output tokens")
    print("| prefix caching | seconds | output tok/s | requests/s | hit rate |")
    print("|---|---:|---:|---:|---:|")
    for r in (off, on):
        print(f"| {'on' if r['caching'] else 'off'} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['hit_rate']:.1%} |")
    print(f"speed-up with caching: {ratio:.2f}x "
          f"(target >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
          f"greedy outputs equal for {same}/{len(prompts)} requests")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()},
        off=off, on=on, speedup=ratio, outputs_equal=same), indent=2))


if __name__ == "__main__":
    main()
