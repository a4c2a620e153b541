"""Offline throughput: pagedserve vs HF static batching vs HF continuous batching.

Every system gets the same ~56M-parameter Llama-shaped random model (float32,
CPU), the same seeded workload and the same KV memory budget, expressed in
tokens of KV (`--kv-tokens`; one token = 2 x layers x kv_heads x head_dim
floats). Each system warms up outside the timing, then one wall-clock timer
covers the whole scenario.

* pagedserve: `LLM.generate` over all requests at once (continuous batching);
  its KV pool is exactly `--kv-tokens` slots (`num_gpu_blocks`).
* HF static: `model.generate` on left-padded batches taken in arrival order,
  each batch running until its longest request is done (min_new_tokens =
  max_new_tokens = the batch's largest output length). A static batcher must
  reserve, for every sequence, room for the longest request it may get: the
  scenario's max prompt + max output. So the batch size that the same budget
  allows is `kv_tokens // (max prompt + max output)` (at least 1); that is the
  pre-allocating baseline PagedAttention is measured against. (HF's
  DynamicCache grows as it goes; it is the batch size that follows the budget.)
* HF continuous batching: the manager behind `model.generate_batch`
  (`continuous_batching_context_manager`), so that each request gets its own
  `max_new_tokens` through `add_request`; paged KV cache of `--kv-tokens`
  tokens (ContinuousBatchingConfig.num_blocks x page_size, page_size =
  pagedserve's block size), same max tokens per step, attention "sdpa".

Outputs are greedy with EOS ignored (EOS is an ordinary token in every system:
`ignore_eos`, and eos_token_id=-1 for HF), so every request produces exactly
its own output length and greedy tokens can be compared request by request
(reported as a match count: batch composition may flip a near-tie). Useful
tokens are those: the tokens a static batch keeps generating for a request
past its own length are computed but not counted.
Throughput is useful output tokens / wall time.

Prompt lengths are the vLLM paper's memory-study scenarios divided by
`--scale`, so that all scenarios and all three systems finish in ~10-20
minutes on 2 CPU cores (the default run: ~11 minutes). The budget defaults to
65536 / scale tokens so that memory pressure follows the prompt lengths. Torch
runs one thread by default: on a small shared machine two intra-op threads
stall (up to 5x here) whenever another process takes a core, while one thread
is only slowed when both are.

    python benchmarks/throughput.py [--scale 16] [--scenarios mixed] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.utils import logging as hf_logging

from pagedserve import LLM, SamplingParams
from pagedserve.testing import cached_random_model

# (count, min prompt, max prompt) per part, before scaling.
SCENARIOS = {
    "short-chat": [(200, 20, 500)],
    "medium": [(200, 50, 2000)],
    "long-document": [(100, 200, 8000)],
    "mixed": [(30, 10, 200), (30, 200, 2000), (20, 1000, 6000)],
}
MODEL = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=8704)
FIRST_TOKEN = 6  # ids 0..5 are the tokenizer's special tokens (BOS, EOS, PAD, ...)
BLOCK = 16
MAX_BATCHED_TOKENS = 2048


def workload(name: str, args) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, in arrival order; seeded."""
    rng = random.Random(f"{name}-{args.seed}")
    lengths = [(rng.randint(max(1, round(lo / args.scale)), max(1, round(hi / args.scale))),
                rng.randint(args.output_min, args.output_max))
               for count, lo, hi in SCENARIOS[name]
               for _ in range(max(1, round(count * args.requests_scale)))]
    rng.shuffle(lengths)  # mixed: the three kinds arrive interleaved
    return [([rng.randrange(FIRST_TOKEN, MODEL["vocab_size"]) for _ in range(p)], o)
            for p, o in lengths]


def run_pagedserve(model_dir, requests, kv_tokens, max_len):
    llm = LLM(model=str(model_dir), block_size=BLOCK, num_gpu_blocks=kv_tokens // BLOCK,
              max_model_len=max_len, max_num_seqs=256, max_num_batched_tokens=MAX_BATCHED_TOKENS,
              dtype="float32", device="cpu", skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = llm.get_memory_stats()
    return elapsed, [list(out.outputs[0].token_ids) for out in outs], stats


def run_hf_static(model, requests, batch_size, pad_id):
    tokens = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(requests), batch_size):
            batch = requests[first:first + batch_size]
            width = max(len(p) for p, _ in batch)
            new = max(o for _, o in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch],
                               device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch],
                                device=model.device)
            # eos_token_id=-1: EOS is an ordinary token, as with ignore_eos (min_new_tokens
            # alone would also stop nothing, but by masking EOS out of the argmax).
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=-1)
            tokens += [row[width:width + o].tolist() for row, (_, o) in zip(out, batch)]
    return time.perf_counter() - start, tokens


def run_hf_batch(model, requests, kv_tokens, pad_id, max_batch_tokens=MAX_BATCHED_TOKENS):
    """HF continuous batching with per-request max_new_tokens; returns (seconds, tokens, info)."""
    # transformers 5.17 calls the page size block_size and has no auto_switch_to_flash or seed.
    fields = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    options = dict(num_blocks=kv_tokens // BLOCK, max_batch_tokens=max_batch_tokens,
                   max_requests_per_batch=256, auto_switch_to_flash=False, seed=0)
    options["page_size" if "page_size" in fields else "block_size"] = BLOCK
    cb_config = ContinuousBatchingConfig(**{k: v for k, v in options.items() if k in fields})
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=pad_id,
                                  max_new_tokens=max(o for _, o in requests))
    results = {}
    with model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config) as manager:
        cache = manager.batch_processor.cache if manager.batch_processor else None
        info = {"cache_tokens": cache.num_blocks * BLOCK if cache else None,
                "attn_implementation": model.config._attn_implementation}
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(requests):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=out_len, eos_token_id=-1)
        while len(results) < len(requests):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"HF generate_batch request {result.request_id}: "
                                       f"{result.error}")
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching thread stopped with requests unfinished")
        elapsed = time.perf_counter() - start
    return elapsed, [list(results[f"r{i}"].generated_tokens) for i in range(len(requests))], info


def warm_up(model_dir, hf_model, pad_id, skip_hf_batch):
    rng = random.Random(0)
    requests = [([rng.randrange(FIRST_TOKEN, 1000) for _ in range(n)], 8) for n in (24, 40)]
    run_pagedserve(model_dir, requests, 1024, 64)
    run_hf_static(hf_model, requests, 2, pad_id)
    if not skip_hf_batch:
        run_hf_batch(hf_model, requests, 1024, pad_id)


def matches(ours, theirs, requests):
    return sum(a[:o] == b[:o] for a, b, (_, o) in zip(ours, theirs, requests))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--scale", type=float, default=16.0, help="divide prompt lengths by this")
    parser.add_argument("--requests-scale", type=float, default=1.0,
                        help="multiply request counts (200/200/100/80) by this")
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=128)
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="KV budget in tokens for every system (default 65536/scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable on a shared machine, see the docstring)")
    parser.add_argument("--skip-hf-batch", action="store_true", help="skip HF generate_batch")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a <1 minute smoke run")
    args = parser.parse_args()
    if args.quick:
        args.scale, args.requests_scale, args.output_min, args.output_max = 64.0, 0.03, 4, 12
    if args.kv_tokens is None:
        args.kv_tokens = int(65536 / args.scale)
    args.kv_tokens -= args.kv_tokens % BLOCK
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # eos_token_id=-1 warns once per generate() call
    command = "python " + " ".join(["benchmarks/throughput.py", *sys.argv[1:]])
    machine = (f"{platform.platform()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch "
               f"thread{'s' * (args.threads > 1)}), torch {torch.__version__}")
    today = datetime.date.today().isoformat()
    model_dir = cached_random_model("bench-llama-50m", arch="llama", **MODEL)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    pad_id = hf_model.config.pad_token_id
    n_params = sum(p.numel() for p in hf_model.parameters())
    kv_bytes_per_token = (2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"]
                          * MODEL["hidden_size"] // MODEL["num_attention_heads"] * 4)
    print(f"# Throughput, {today}\n{command}\n{machine}")
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters {MODEL}, float32, sdpa (HF)")
    print(f"scale {args.scale:g} (prompt lengths / {args.scale:g}), "
          f"requests x {args.requests_scale:g}, "
          f"outputs {args.output_min}-{args.output_max} tokens, greedy, ignore_eos, "
          f"seed {args.seed}")
    print(f"KV budget: {args.kv_tokens} tokens = "
          f"{args.kv_tokens * kv_bytes_per_token / 2**20:.0f} MiB "
          f"for every system; block/page size {BLOCK}; "
          f"max {MAX_BATCHED_TOKENS} tokens per step\n")
    warm_up(model_dir, hf_model, pad_id, args.skip_hf_batch)

    results = []
    for name in args.scenarios:
        requests = workload(name, args)
        max_prompt = max(len(p) for p, _ in requests)
        reserve = max_prompt + args.output_max  # what a static batcher must reserve per sequence
        longest = max(len(p) + o for p, o in requests)
        if longest > MODEL["max_position_embeddings"] or args.kv_tokens < reserve:
            raise SystemExit(f"{name}: a request of {longest} tokens (reserve {reserve}) does not "
                             f"fit max_position_embeddings or --kv-tokens={args.kv_tokens}")
        batch_size = max(1, args.kv_tokens // reserve)
        useful = sum(o for _, o in requests)
        row = {"scenario": name, "requests": len(requests),
               "prompt_tokens": sum(len(p) for p, _ in requests), "output_tokens": useful,
               "max_prompt": max_prompt, "static_batch_size": batch_size}
        print(f"## {name}: {row['requests']} requests, {row['prompt_tokens']} prompt tokens, "
              f"{useful} useful output tokens; static batch {batch_size} "
              f"(= {args.kv_tokens} // ({max_prompt} + {args.output_max}))", flush=True)

        seconds, ours, stats = run_pagedserve(model_dir, requests, args.kv_tokens, reserve)
        row.update(paged_s=seconds, paged_tok_s=useful / seconds,
                   slot_utilization=stats["mean_slot_utilization"],
                   preemptions=stats["num_preemptions"],
                   peak_kv_tokens=stats["peak_allocated_blocks"] * BLOCK)
        print(f"  pagedserve     {seconds:8.1f} s {useful / seconds:8.1f} tok/s  "
              f"KV slot utilization {row['slot_utilization']:.1%}, "
              f"{row['preemptions']} preemptions",
              flush=True)

        seconds, theirs = run_hf_static(hf_model, requests, batch_size, pad_id)
        row.update(static_s=seconds, static_tok_s=useful / seconds,
                   match_static=matches(ours, theirs, requests),
                   speedup_static=row["paged_tok_s"] / (useful / seconds))
        print(f"  HF static      {seconds:8.1f} s {useful / seconds:8.1f} tok/s  "
              f"greedy tokens equal pagedserve's: {row['match_static']}/{len(requests)}",
              flush=True)

        if not args.skip_hf_batch:
            seconds, theirs, info = run_hf_batch(hf_model, requests, args.kv_tokens, pad_id)
            row.update(batch_s=seconds, batch_tok_s=useful / seconds, hf_batch_info=info,
                       match_batch=matches(ours, theirs, requests),
                       speedup_batch=row["paged_tok_s"] / (useful / seconds))
            print(f"  HF gen_batch   {seconds:8.1f} s {useful / seconds:8.1f} tok/s  "
                  f"greedy tokens equal pagedserve's: {row['match_batch']}/{len(requests)} {info}",
                  flush=True)
        results.append(row)

    def cell(row, key, fmt, suffix=""):
        return format(row[key], fmt) + suffix if key in row else "-"

    print(f"\n### Offline throughput ({today})\n\n`{command}`  \n{machine}  \n"
          f"Model: Llama-shaped random weights, {n_params / 1e6:.1f}M parameters, float32. "
          f"Prompt lengths / {args.scale:g}, requests x {args.requests_scale:g}, outputs "
          f"{args.output_min}-{args.output_max} tokens (greedy, EOS ignored). KV budget "
          f"{args.kv_tokens} tokens for every system. "
          "Throughput = useful output tokens / wall time.\n")
    print("| scenario | requests | prompt tok | output tok | static batch | pagedserve tok/s (s) "
          "| HF static tok/s (s) | HF generate_batch tok/s (s) | vs static | vs generate_batch "
          "| KV slot util. | preemptions | tokens = HF static, = generate_batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n = r["requests"]
        print(f"| {r['scenario']} | {r['requests']} | {r['prompt_tokens']} | {r['output_tokens']} "
              f"| {r['static_batch_size']} | {r['paged_tok_s']:.0f} ({r['paged_s']:.1f}) "
              f"| {r['static_tok_s']:.0f} ({r['static_s']:.1f}) "
              f"| {cell(r, 'batch_tok_s', '.0f')} ({cell(r, 'batch_s', '.1f')}) "
              f"| {r['speedup_static']:.2f}x | {cell(r, 'speedup_batch', '.2f', 'x')} "
              f"| {r['slot_utilization']:.1%} | {r['preemptions']} "
              f"| {r['match_static']}/{n}, {cell(r, 'match_batch', 'd', f'/{n}')} |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine, "date": today,
                               "parameters": n_params, "model": MODEL, "args": vars(args),
                               "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
