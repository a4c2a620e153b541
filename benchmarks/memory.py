"""KV memory: paged blocks vs max-length pre-allocation, and what block sharing saves.

How much KV memory holds real tokens, and how much sharing saves, are properties
of the allocator and the scheduler, not of the model. So this script drives
pagedserve's real `Scheduler` and `BlockManager` with a fake executor (tokens
without a model) and reads every figure off the block manager, step by step.

1. Memory table, on the vLLM paper's four memory-study scenarios at their
   published lengths (outputs 16-512 tokens, EOS ignored). Each scenario offers
   `LOAD` pools' worth of tokens, so the pool fills and the peak concurrency is
   the pool's limit, not the workload's. Paged (pagedserve, continuous
   batching) is compared with a static batcher that reserves the scenario's max
   prompt + max output per sequence until its whole batch ends, as HF
   `generate` does, in the same pool. Slots allocated, used (tokens stored) and
   wasted are means over steps; utilization is used / allocated over all steps
   (slot-steps). The target is waste <= 4% for paged in every scenario.
2. Sharing, prefix caching off so blocks are shared only by forking: parallel
   sampling (n = 2, 4, 6; samples fork off the prompt) and beam search (width
   2, 4, 6; beams fork and drop every step) on ShareGPT-like lengths (prompts
   50-1000, outputs 50-500). Saved = 1 - physical / logical blocks, summed over
   steps, where logical blocks are what separate copies would take, as in the
   paper's Fig. 15 (parallel sampling 6.1-30.5% saved, beam search 37.6-66.3%).
   EOS is ignored, so samples share exactly the prompt: the saving grows with
   the prompt's share of the tokens, which is larger here than in the paper's
   datasets (ShareGPT: 161 prompt, 338 output tokens on average).

3. Sliding windows: a long-context workload (prompts of 1/32 to 1/8 of the
   pool, 8k-32k tokens at the default pool, outputs 16-512) on a model whose
   every layer attends over the last pool / 64 positions (4,096, Mistral-7B-v0.1's
   window, at the default pool), with the blocks before each sequence's window
   freed (`BlockManager(sliding_window=...)`) and kept. Reported: blocks held per
   running sequence and sequences running at once (means over steps), steps to
   finish the workload, and preemptions.

4. KV cache dtype: the bytes of a bfloat16 pool of `--pool-tokens` tokens of
   `--model` (a bundled preset's shape), as a pool of `--kv-cache-dtype` (fp8: one
   byte a value, as engine.kv_cache_dtype stores it) instead. Both pools' blocks
   come from the engine's own sizing (kv_bytes_per_token at the KV dtype's
   itemsize), and both serve the same "mixed" workload, offered LOAD of the larger
   pool's worth of tokens: blocks, the sequences running while requests wait for
   blocks (mean over those steps: what the pool admits) and at the peak, and each
   as a ratio against bfloat16.

It prints markdown tables for BENCHMARKS.md and writes `memory.json`,
`memory_utilization.png` and `memory_sharing.png` to `--out-dir`.

    python benchmarks/memory.py                     # full run
    python benchmarks/memory.py --quick             # smoke run, a few seconds
    python benchmarks/memory.py --pool-tokens 65536 --block-size 16 --seed 1
    python benchmarks/memory.py --kv-cache-dtype fp8_e5m2 --model llama-3-70b
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from memory_figures import plot_sharing, plot_utilization

from pagedserve.kernels.kv_quant import KV_CACHE_DTYPES, kv_cache_dtype
from pagedserve.model.shape import ModelShape, load_presets
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.beam_search import BeamSearch
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import SequenceGroup
from pagedserve.scheduler.step import Sample, StepInput, StepOutput

# (weight, min prompt, max prompt) per part: the vLLM paper's memory-study scenarios.
SCENARIOS = {
    "short-chat": [(1, 20, 500)],
    "medium": [(1, 50, 2000)],
    "long-document": [(1, 200, 8000)],
    "mixed": [(3, 10, 200), (3, 200, 2000), (2, 1000, 6000)],
}
OUTPUTS = (16, 512)
LOAD = 3  # pools' worth of tokens per scenario: enough to keep the pool full most of the run
SHARING_PROMPTS, SHARING_OUTPUTS = (50, 1000), (50, 500)  # ShareGPT-like
WIDTHS = (2, 4, 6)
# vLLM paper, Fig. 15 (OPT-13B on Alpaca and ShareGPT): fraction of blocks saved.
PAPER_SAVED = {"parallel": (0.061, 0.305), "beam": (0.376, 0.663)}
WASTE_TARGET = 0.04
MAX_BATCHED_TOKENS = 8192
VOCAB = 32000


class FakeExecutor:
    """Tokens without a model: distinct per parallel sample, seeded candidates for beams."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def execute(self, step: StepInput) -> StepOutput:
        samples: list[Sample] = []
        for row in step.seqs:
            if row.do_sample and row.num_candidates is not None:
                samples.append(self._beam_row(row.seq_id, row.num_candidates))
            elif row.do_sample:  # the prompt's row is sampled once per sample
                samples.extend(Sample(row.seq_id, (row.seq_id * 7919 + row.context_len * 31 + j)
                                      % VOCAB, -1.0) for j in range(row.num_samples))
        return StepOutput(samples)

    def _beam_row(self, seq_id: int, count: int) -> Sample:
        """`count` distinct tokens, best first: the top logprob is -Exp(mean 0.5), then gaps
        of Exp(mean 1). Beam scores cross, so beams fork and get dropped every few steps,
        and they end up sharing all but their last blocks whatever these two means are.
        Only a near-deterministic model (gaps never small) keeps beams apart, sharing the
        prompt alone, as parallel samples do."""
        logprob = -self.rng.expovariate(2.0)
        candidates = []
        for token in self.rng.sample(range(VOCAB), count):
            candidates.append((token, logprob))
            logprob -= self.rng.expovariate(1.0)
        return Sample(seq_id, candidates[0][0], candidates[0][1], candidates=candidates)


def make_scheduler(pool_tokens: int, block_size: int, max_model_len: int,
                   sliding_window: int | None = None) -> Scheduler:
    """The 1% watermark EngineCore sets, and a CPU pool (as large as the GPU one) so a
    preempted group of samples or beams is swapped, keeping its sharing, not recomputed."""
    num_blocks = pool_tokens // block_size
    manager = BlockManager(num_blocks, block_size, watermark_blocks=max(1, num_blocks // 100),
                           num_cpu_blocks=num_blocks, sliding_window=sliding_window)
    # Every running sequence holds a block: max_num_seqs=num_blocks leaves the pool the limit.
    config = SchedulerConfig(max_num_seqs=num_blocks, max_num_batched_tokens=MAX_BATCHED_TOKENS,
                             max_model_len=max_model_len)
    return Scheduler(config, manager)


def drive(scheduler: Scheduler, seed: int) -> Iterator[int]:
    """Run every request to completion; yields, after each step, the sequences it ran with."""
    executor = FakeExecutor(seed)
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        running = scheduler.num_running_seqs
        scheduler.free_finished(scheduler.update(step, executor.execute(step)))
        yield running


@dataclass
class Usage:
    """KV slots summed over steps."""

    steps: int = 0
    allocated: int = 0
    used: int = 0

    def add(self, allocated: int, used: int) -> None:
        self.steps += 1
        self.allocated += allocated
        self.used += used

    def summary(self) -> dict[str, float]:
        return {"allocated": self.allocated / self.steps, "used": self.used / self.steps,
                "wasted": (self.allocated - self.used) / self.steps,
                "utilization": self.used / self.allocated, "steps": self.steps}


# -- 1. the memory table -------------------------------------------------------
def workload(name: str, pool_tokens: int, seed: int) -> list[tuple[int, int]]:
    """(prompt length, output length) per request, in arrival order, LOAD pools' worth."""
    parts = SCENARIOS[name]
    total = sum(weight for weight, _, _ in parts)
    mean_tokens = sum(w * (lo + hi) / 2 for w, lo, hi in parts) / total + sum(OUTPUTS) / 2
    num_requests = max(1, round(LOAD * pool_tokens / mean_tokens))
    rng = random.Random(seed)
    counts = [max(1, round(num_requests * weight / total)) for weight, _, _ in parts]
    requests = [(rng.randint(lo, hi), rng.randint(*OUTPUTS))
                for count, (_, lo, hi) in zip(counts, parts, strict=True) for _ in range(count)]
    rng.shuffle(requests)
    return requests


def max_length(name: str) -> int:
    """What a pre-allocating system provisions per sequence: max prompt + max output."""
    return max(hi for _, _, hi in SCENARIOS[name]) + OUTPUTS[1]


def paged(name: str, requests: list[tuple[int, int]], pool_tokens: int,
          args: argparse.Namespace) -> dict:
    """pagedserve: blocks are taken as tokens arrive and freed when a request ends."""
    scheduler = make_scheduler(pool_tokens, args.block_size, max_length(name))
    manager = scheduler.block_manager
    for index, (prompt_len, output_len) in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        scheduler.add(SequenceGroup(str(index), [scheduler.new_sequence([1] * prompt_len)], params))
    usage, peak, admitted = Usage(), 0, []
    # One sequence per request: nothing is forked or swapped (a lone sequence is
    # recomputed when preempted), so every stored token sits in this pool's slots.
    for running in drive(scheduler, args.seed):
        peak = max(peak, running)
        if scheduler.waiting:  # requests wait for blocks: the pool holds what it can
            admitted.append(running)
        if manager.num_allocated_blocks:
            usage.add(manager.num_allocated_blocks * args.block_size, manager.num_stored_tokens())
    return {**usage.summary(), "max_concurrent_seqs": peak,
            "mean_admitted": sum(admitted) / max(1, len(admitted)),
            "preemptions": scheduler.num_preemptions}


def preallocated(name: str, requests: list[tuple[int, int]], pool_tokens: int) -> dict:
    """Static batches of pool // max length sequences; each decode step is one time step."""
    reserve = max_length(name)
    batch_size = pool_tokens // reserve
    usage = Usage()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        for t in range(1, max(o for _, o in batch) + 1):
            usage.add(len(batch) * reserve, sum(p + min(t, o) for p, o in batch))
    return {**usage.summary(), "max_concurrent_seqs": batch_size}


def memory_table(args: argparse.Namespace) -> dict:
    results = {}
    for name in SCENARIOS:
        requests = workload(name, args.pool_tokens, args.seed)
        ours = paged(name, requests, args.pool_tokens, args)
        results[name] = {"requests": len(requests), "paged": ours,
                         "preallocation": preallocated(name, requests, args.pool_tokens),
                         "waste_target_met": 1 - ours["utilization"] <= WASTE_TARGET}
    return results


# -- 2. sharing ----------------------------------------------------------------
def sharing_group(scheduler: Scheduler, request_id: str, prompt_len: int, output_len: int,
                  width: int, beam: bool) -> SequenceGroup:
    """One request with `width` samples or beams, built as EngineCore.add_request does."""
    if beam:
        params = SamplingParams(n=width, best_of=width, use_beam_search=True, temperature=0.0,
                                max_tokens=output_len, ignore_eos=True)
    else:
        params = SamplingParams(n=width, temperature=1.0, max_tokens=output_len, ignore_eos=True)
    group = SequenceGroup(request_id, [scheduler.new_sequence([1] * prompt_len)], params)
    if beam:
        group.beam_search = BeamSearch(num_beams=width, num_return_sequences=width,
                                       length_penalty=1.0, early_stopping=False,
                                       eos_token_ids=frozenset(), max_new_tokens=output_len)
    return group


def saved(requests: list[tuple[int, int]], width: int, beam: bool,
          args: argparse.Namespace) -> dict[str, float]:
    """Blocks the pool holds vs table entries (separate copies), summed over steps."""
    scheduler = make_scheduler(args.pool_tokens, args.block_size,
                               SHARING_PROMPTS[1] + SHARING_OUTPUTS[1])
    manager = scheduler.block_manager
    for index, (prompt_len, output_len) in enumerate(requests):
        scheduler.add(sharing_group(scheduler, str(index), prompt_len, output_len, width, beam))
    physical = logical = 0
    for _ in drive(scheduler, args.seed):
        physical += manager.num_allocated_blocks
        logical += manager.num_logical_blocks
    return {"physical_blocks": physical, "logical_blocks": logical, "saved": 1 - physical / logical,
            "preemptions": scheduler.num_preemptions, "swaps": scheduler.num_swaps}


def sharing(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    requests = [(rng.randint(*SHARING_PROMPTS), rng.randint(*SHARING_OUTPUTS))
                for _ in range(args.sharing_requests)]
    return {method: {str(w): saved(requests, w, method == "beam", args) for w in WIDTHS}
            for method in ("parallel", "beam")}


# -- 3. sliding windows ----------------------------------------------------------
def window_prompts(pool_tokens: int) -> tuple[int, int]:
    return pool_tokens // 32, pool_tokens // 8


def windowed(requests: list[tuple[int, int]], window: int | None,
             args: argparse.Namespace) -> dict[str, float]:
    """Blocks per running sequence and sequences at once, freeing before the window or not."""
    scheduler = make_scheduler(args.pool_tokens, args.block_size,
                               window_prompts(args.pool_tokens)[1] + OUTPUTS[1],
                               sliding_window=window)
    manager = scheduler.block_manager
    for index, (prompt_len, output_len) in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        scheduler.add(SequenceGroup(str(index), [scheduler.new_sequence([1] * prompt_len)], params))
    steps = running_sum = blocks_sum = 0
    for running in drive(scheduler, args.seed):
        steps += 1
        running_sum += running
        blocks_sum += manager.num_allocated_blocks / max(1, running)
    return {"steps": steps, "mean_running": running_sum / steps,
            "blocks_per_seq": blocks_sum / steps, "preemptions": scheduler.num_preemptions}


def windows(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts, window = window_prompts(args.pool_tokens), args.pool_tokens // 64
    count = max(1, round(LOAD * args.pool_tokens / (sum(prompts) / 2)))
    requests = [(rng.randint(*prompts), rng.randint(*OUTPUTS)) for _ in range(count)]
    return {"requests": len(requests), "window": window, "prompts": prompts,
            "freed": windowed(requests, window, args), "kept": windowed(requests, None, args)}


# -- 4. KV cache dtype ----------------------------------------------------------------
KV_SCENARIO = "mixed"


def kv_dtypes(args: argparse.Namespace) -> dict:
    """bfloat16's pool and the same bytes in args.kv_cache_dtype, on one workload."""
    shape = ModelShape.from_hf_config(load_presets()[args.model], args.model)
    pool_bytes = args.pool_tokens * shape.kv_bytes_per_token(1, torch.bfloat16.itemsize)
    rows = {}
    for name in ("bfloat16", args.kv_cache_dtype):
        dtype = torch.bfloat16 if name == "bfloat16" else kv_cache_dtype(name, torch.bfloat16)
        block_bytes = args.block_size * shape.kv_bytes_per_token(1, dtype.itemsize)
        rows[name] = {"block_bytes": block_bytes, "blocks": pool_bytes // block_bytes}
    larger = max(row["blocks"] for row in rows.values()) * args.block_size
    requests = workload(KV_SCENARIO, larger, args.seed)
    for row in rows.values():
        row.update(paged(KV_SCENARIO, requests, row["blocks"] * args.block_size, args))
    for row in rows.values():
        for key in ("blocks", "max_concurrent_seqs", "mean_admitted"):
            row[f"{key}_vs_bfloat16"] = row[key] / rows["bfloat16"][key]
    return {"model": args.model, "pool_bytes": pool_bytes, "scenario": KV_SCENARIO,
            "requests": len(requests), "pools": rows}


# -- 5. output (the figures: memory_figures.py) ------------------------------------
def print_window_table(window: dict) -> None:
    low, high = window["prompts"]
    print(f"\n{window['requests']} requests of {low}-{high} prompt tokens, every layer's "
          f"window {window['window']}")
    print("| blocks before the window | blocks per running sequence | sequences at once "
          "| steps | preemptions |")
    print("|---|---|---|---|---|")
    for name in ("kept", "freed"):
        r = window[name]
        print(f"| {name} | {r['blocks_per_seq']:,.0f} | {r['mean_running']:.1f} "
              f"| {r['steps']:,} | {r['preemptions']} |")


def print_kv_dtype_table(kv: dict) -> None:
    print(f"\n{kv['model']}, {kv['pool_bytes'] / 2**30:.2f} GiB of KV pool, "
          f"{kv['requests']} {kv['scenario']} requests")
    print("| KV cache dtype | bytes a block | blocks | sequences admitted (mean) | peak "
          "| preemptions | blocks vs bf16 | admitted vs bf16 | peak vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in kv["pools"].items():
        print(f"| {name} | {r['block_bytes']:,} | {r['blocks']:,} | {r['mean_admitted']:.1f} "
              f"| {r['max_concurrent_seqs']} | {r['preemptions']} "
              f"| {r['blocks_vs_bfloat16']:.2f}x | {r['mean_admitted_vs_bfloat16']:.2f}x "
              f"| {r['max_concurrent_seqs_vs_bfloat16']:.2f}x |")


def print_tables(memory: dict, shared: dict) -> None:
    print("| scenario | requests | system | slots allocated | used | wasted | utilization "
          "| max concurrent seqs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in memory.items():
        for system in ("paged", "preallocation"):
            r = row[system]
            print(f"| {name} | {row['requests']} | {system} | {r['allocated']:,.0f} "
                  f"| {r['used']:,.0f} | {r['wasted']:,.0f} | {r['utilization']:.1%} "
                  f"| {r['max_concurrent_seqs']} |")
    for name, row in memory.items():
        waste = 1 - row["paged"]["utilization"]
        print(f"- {name}: paged waste {waste:.1%}, target <= {WASTE_TARGET:.0%}: "
              f"{'met' if row['waste_target_met'] else 'NOT met'}")
    print("\n| method | n / width | physical blocks | logical blocks | saved | paper |")
    print("|---|---|---|---|---|---|")
    for method, label in (("parallel", "parallel sampling"), ("beam", "beam search")):
        lo, hi = PAPER_SAVED[method]
        for w, r in shared[method].items():
            print(f"| {label} | {w} | {r['physical_blocks']:,} | {r['logical_blocks']:,} "
                  f"| {r['saved']:.1%} | {lo:.1%}-{hi:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small pool, few requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-tokens", type=int, help="KV pool in tokens (262144; quick 16384)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sharing-requests", type=int,
                        help="requests per sharing run (200; quick 8)")
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default="fp8",
                        help="the fp8 KV cache compared with bfloat16 (section 4)")
    parser.add_argument("--model", choices=sorted(load_presets()), default="llama-3-8b",
                        help="the preset whose KV bytes a token size the pools of section 4")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.pool_tokens = args.pool_tokens or (16384 if args.quick else 262144)
    args.sharing_requests = args.sharing_requests or (8 if args.quick else 200)

    start = time.perf_counter()
    print(f"# KV memory, {datetime.date.today()}, {platform.platform()}")
    print(f"pool {args.pool_tokens} tokens, block size {args.block_size}, seed {args.seed}\n")
    memory, shared, window = memory_table(args), sharing(args), windows(args)
    kv = kv_dtypes(args)
    print_tables(memory, shared)
    print_window_table(window)
    print_kv_dtype_table(kv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_utilization(memory, args.out_dir / "memory_utilization.png", WASTE_TARGET)
    plot_sharing(shared, args.out_dir / "memory_sharing.png", PAPER_SAVED)
    wall = time.perf_counter() - start
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"date": str(datetime.date.today()), "platform": platform.platform(), "config": config,
              "outputs": OUTPUTS, "load": LOAD, "waste_target": WASTE_TARGET,
              "sharing_workload": {"prompts": SHARING_PROMPTS, "outputs": SHARING_OUTPUTS},
              "memory": memory, "sharing": shared, "sliding_window": window,
              "kv_cache_dtype": kv,
              "paper_saved": PAPER_SAVED, "wall_s": wall}
    (args.out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    print(f"\nwall time {wall:.1f} s; results in {args.out_dir}/")


if __name__ == "__main__":
    main()
