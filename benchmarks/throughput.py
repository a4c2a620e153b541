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

* vLLM (`--peer vllm`): vLLM's CPU build, in its own venv (`make peer-vllm`),
  driven by benchmarks/vllm_peer.py in a process of its own, started once with
  the same weights, a KV cache of the same bytes (`kv_cache_memory_bytes`) and
  block size 32 (vLLM's CPU attention needs a multiple of 32). pagedserve then
  runs at block size 32, and at `--block-size` (16) too. `--threads` sets
  vLLM's compute threads as well (VLLM_CPU_OMP_THREADS_BIND); `--one-core` pins
  every process of both systems to CPU 0, so that vLLM's polling engine and
  frontend are charged to the same core as its compute.

With `--rounds N` the systems run N times each, in an order rotated every
round, and the tables give medians. CPU-seconds are counted per process over
the timed run: this process for pagedserve and HF; for vLLM, its frontend and
its child processes (engine core and model worker).

Prompt lengths are the vLLM paper's memory-study scenarios divided by
`--scale`, so that all scenarios and all three systems finish in ~10-20
minutes on 2 CPU cores (the default run: ~11 minutes). The budget defaults to
65536 / scale tokens so that memory pressure follows the prompt lengths. Torch
runs one thread by default: on a small shared machine two intra-op threads
stall (up to 5x here) whenever another process takes a core, while one thread
is only slowed when both are.

    python benchmarks/throughput.py [--scale 16] [--scenarios mixed] [--quick]
    python benchmarks/throughput.py --peer vllm --rounds 3 [--threads 2] [--one-core]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.utils import logging as hf_logging
from vllm_peer import VLLMPeer
from workloads import ARCHS, FIRST_TOKEN, MODEL, SCENARIOS, workload

from pagedserve import LLM, SamplingParams
from pagedserve.model.shape import ModelShape
from pagedserve.testing import cached_random_model

BLOCK = 16
MAX_BATCHED_TOKENS = 2048
RESULTS = Path("benchmarks/results")


def run_pagedserve(model_dir, requests, kv_tokens, max_len, block=BLOCK, threads=None):
    llm = LLM(model=str(model_dir), block_size=block, num_gpu_blocks=kv_tokens // block,
              cpu_threads=threads or torch.get_num_threads(),
              max_model_len=max_len, max_num_seqs=256, max_num_batched_tokens=MAX_BATCHED_TOKENS,
              dtype="float32", device="cpu", skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    cpu, start = time.process_time(), time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = llm.get_memory_stats()
    stats["cpu_s"] = cpu
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
            tokens += [row[width:width + o].tolist()
                       for row, (_, o) in zip(out, batch, strict=True)]
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


def warm_up(model_dir, hf_model, pad_id, args, peer):
    rng = random.Random(0)
    requests = [([rng.randrange(FIRST_TOKEN, 1000) for _ in range(n)], 8) for n in (24, 40)]
    for block in args.blocks:
        run_pagedserve(model_dir, requests, 1024, 64, block)
    if not args.skip_hf:
        run_hf_static(hf_model, requests, 2, pad_id)
        if not args.skip_hf_batch:
            run_hf_batch(hf_model, requests, 1024, pad_id)
    if peer is not None:
        peer.run(requests)


def matches(ours, theirs, requests):
    return sum(a[:o] == b[:o] for a, b, (_, o) in zip(ours, theirs, requests, strict=True))


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
                        help="compute threads (1: stable on a shared machine, see the docstring)")
    parser.add_argument("--block-size", type=int, default=BLOCK, help="pagedserve's block size")
    parser.add_argument("--peer", choices=["none", "vllm"], default="none")
    parser.add_argument("--arch", choices=list(ARCHS), default="llama",
                        help="the model: Llama-shaped, or Mixtral-shaped (8 experts, top 2)")
    parser.add_argument("--one-core", action="store_true",
                        help="pin every process to CPU 0 (a fair CPU-second count for vLLM)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system; medians reported")
    parser.add_argument("--skip-hf", action="store_true", help="skip both HF systems")
    parser.add_argument("--skip-hf-batch", action="store_true", help="skip HF generate_batch")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a <1 minute smoke run")
    args = parser.parse_args()
    if args.quick:
        args.scale, args.requests_scale, args.output_min, args.output_max = 64.0, 0.03, 4, 12
    if args.kv_tokens is None:
        args.kv_tokens = int(65536 / args.scale)
    # With vLLM as the peer, pagedserve runs at vLLM's block size as well as its own.
    args.blocks = sorted({args.block_size} | ({VLLMPeer.BLOCK} if args.peer == "vllm" else set()))
    args.kv_tokens -= args.kv_tokens % max(args.blocks)
    return args


def median_row(runs: list[dict]) -> dict:
    """The median of each number over rounds (tokens come from the first round)."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(run[key] for run in runs)
    row["rounds"] = [{k: v for k, v in run.items() if k != "tokens"} for run in runs]
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.one_core:
        os.sched_setaffinity(0, {0})
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # eos_token_id=-1 warns once per generate() call
    command = "python " + " ".join(["benchmarks/throughput.py", *sys.argv[1:]])
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
    machine = (f"{cpu_model}, {platform.platform()}, {os.cpu_count()} CPUs "
               f"({args.threads} compute thread{'s' * (args.threads > 1)}"
               f"{', all on CPU 0' if args.one_core else ''}), torch {torch.__version__}")
    today = datetime.date.today().isoformat()
    cache_name, model_config = ARCHS[args.arch]
    model_dir = cached_random_model(cache_name, arch=args.arch, **model_config)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    pad_id = hf_model.config.pad_token_id
    n_params = sum(p.numel() for p in hf_model.parameters())
    kv_bytes_per_token = ModelShape.from_config(hf_model.config).kv_bytes_per_token(
        tp=1, dtype_bytes=4)  # float32
    scenarios = {name: workload(name, args) for name in args.scenarios}
    longest = max(len(p) + o for requests in scenarios.values() for p, o in requests)
    RESULTS.mkdir(parents=True, exist_ok=True)
    peer = None
    if args.peer == "vllm":
        reserve = max(len(p) for r in scenarios.values() for p, _ in r) + args.output_max
        peer = VLLMPeer(model_dir, args.kv_tokens * kv_bytes_per_token,
                        max(longest, reserve, 64), args.threads, args.one_core,  # 64: warm-up
                        MAX_BATCHED_TOKENS, RESULTS / "vllm_peer.log")
        machine += f"; vLLM {peer.version} (vllm-cpu)"
    print(f"# Throughput, {today}\n{command}\n{machine}")
    print(f"model: {args.arch}, {n_params / 1e6:.1f}M parameters {model_config}, float32, "
          "sdpa (HF)")
    print(f"scale {args.scale:g} (prompt lengths / {args.scale:g}), "
          f"requests x {args.requests_scale:g}, "
          f"outputs {args.output_min}-{args.output_max} tokens, greedy, ignore_eos, "
          f"seed {args.seed}; {args.rounds} round(s), medians")
    print(f"KV budget: {args.kv_tokens} tokens = "
          f"{args.kv_tokens * kv_bytes_per_token / 2**20:.0f} MiB "
          f"for every system; pagedserve block sizes {args.blocks}; "
          f"max {MAX_BATCHED_TOKENS} tokens per step\n")
    warm_up(model_dir, hf_model, pad_id, args, peer)

    results = []
    try:
        for name, requests in scenarios.items():
            results.append(run_scenario(name, requests, args, model_dir, hf_model, pad_id, peer))
    finally:
        if peer is not None:
            peer.close()
    print_tables(results, args, command, machine, today, n_params)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine, "date": today,
                               "parameters": n_params, "model": model_config,
                               "args": {k: v for k, v in vars(args).items()},
                               "results": results}, indent=2))
    print(f"\nwrote {out}")


def run_scenario(name, requests, args, model_dir, hf_model, pad_id, peer) -> dict:
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
           "max_prompt": max_prompt, "static_batch_size": batch_size, "systems": {}}
    print(f"## {name}: {row['requests']} requests, {row['prompt_tokens']} prompt tokens, "
          f"{useful} useful output tokens; static batch {batch_size} "
          f"(= {args.kv_tokens} // ({max_prompt} + {args.output_max}))", flush=True)

    def paged(block):
        def run():
            seconds, tokens, stats = run_pagedserve(model_dir, requests, args.kv_tokens, reserve,
                                                    block)
            return {"seconds": seconds, "tokens": tokens, "cpu_s": stats["cpu_s"],
                    "slot_utilization": stats["mean_slot_utilization"],
                    "preemptions": stats["num_preemptions"]}
        return run

    def static():
        cpu = time.process_time()
        seconds, tokens = run_hf_static(hf_model, requests, batch_size, pad_id)
        return {"seconds": seconds, "tokens": tokens, "cpu_s": time.process_time() - cpu}

    def batch():
        cpu = time.process_time()
        seconds, tokens, info = run_hf_batch(hf_model, requests, args.kv_tokens, pad_id)
        return {"seconds": seconds, "tokens": tokens, "cpu_s": time.process_time() - cpu,
                "info": info}

    def vllm():
        seconds, tokens, cpu = peer.run(requests)
        return {"seconds": seconds, "tokens": tokens, "cpu_s": cpu["frontend"] + cpu["engine"],
                "cpu_frontend_s": cpu["frontend"], "cpu_engine_s": cpu["engine"]}

    systems = {f"pagedserve b{block}": paged(block) for block in args.blocks}
    if peer is not None:
        systems["vLLM b32"] = vllm
    if not args.skip_hf:
        systems["HF static"] = static
        if not args.skip_hf_batch:
            systems["HF generate_batch"] = batch
    runs = {system: [] for system in systems}
    order = list(systems)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for system in order[shift:] + order[:shift]:
            run = systems[system]()
            run["tok_s"] = useful / run["seconds"]
            runs[system].append(run)
            print(f"  [{round_index + 1}/{args.rounds}] {system:18s} {run['seconds']:7.1f} s "
                  f"{run['tok_s']:7.1f} tok/s  {run['cpu_s']:7.1f} CPU-s", flush=True)
    reference = reference_system(args)
    ours = runs[reference][0]["tokens"]
    for system, system_runs in runs.items():
        summary = median_row(system_runs)
        summary["match"] = matches(ours, summary.pop("tokens"), requests)
        row["systems"][system] = summary
        print(f"  median {system:18s} {summary['tok_s']:7.1f} tok/s {summary['cpu_s']:7.1f} CPU-s  "
              f"greedy tokens equal {reference}'s: {summary['match']}/{len(requests)}", flush=True)
    return row


def reference_system(args) -> str:
    """The pagedserve run others are compared with: at vLLM's block size when it is the peer."""
    return f"pagedserve b{VLLMPeer.BLOCK if args.peer == 'vllm' else args.block_size}"


def print_tables(results, args, command, machine, today, n_params) -> None:
    print(f"\n### Offline throughput ({today})\n\n`{command}`  \n{machine}  \n"
          f"Model: {args.arch}-shaped random weights, {n_params / 1e6:.1f}M parameters, "
          "float32. "
          f"Prompt lengths / {args.scale:g}, requests x {args.requests_scale:g}, outputs "
          f"{args.output_min}-{args.output_max} tokens (greedy, EOS ignored). KV budget "
          f"{args.kv_tokens} tokens for every system. Medians of {args.rounds} round(s). "
          "Throughput = useful output tokens / wall time.\n")
    ours = reference_system(args)
    print("| scenario | system | output tok/s | s | CPU-s | tok/s vs | CPU-s vs "
          f"| greedy tokens = {ours} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        systems = r["systems"]
        for name, s in systems.items():
            versus = "" if name.startswith("pagedserve") else (
                f"{systems[ours]['tok_s'] / s['tok_s']:.2f}x")
            cpu_versus = "" if name.startswith("pagedserve") else (
                f"{systems[ours]['cpu_s'] / s['cpu_s']:.2f}x")
            extra = (f" (frontend {s['cpu_frontend_s']:.1f} + engine {s['cpu_engine_s']:.1f})"
                     if "cpu_engine_s" in s else "")
            print(f"| {r['scenario']} | {name} | {s['tok_s']:.0f} | {s['seconds']:.1f} "
                  f"| {s['cpu_s']:.1f}{extra} | {versus} | {cpu_versus} "
                  f"| {s['match']}/{r['requests']} |")
    print(f"\n(`tok/s vs` and `CPU-s vs`: {ours}'s over the system's.)")


if __name__ == "__main__":
    main()
