"""KV memory utilization at full scale: paged blocks vs max-length pre-allocation.

How much of the KV memory a system allocates holds real tokens is a property of
its allocator and scheduler, not of the model's speed. So this script drives
pagedserve's real `Scheduler` and `BlockManager` with an executor that returns
a token without running a model, on the four workload scenarios at their
published (unscaled) lengths.

It reports, averaged over engine steps, tokens stored / slots allocated. The
same workload is also run through a pre-allocating static batcher, which
reserves `max prompt + max output` slots per sequence and holds them until its
whole batch ends, the way HF `generate` does. Both get the same KV memory
budget.

    python benchmarks/kv_memory.py [--block-size 16] [--pool-tokens 262144]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
from collections.abc import Iterator

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import Sequence, SequenceGroup
from pagedserve.scheduler.step import Sample, StepInput, StepOutput

# (count, min prompt, max prompt) per part; the vLLM paper's memory-study scenarios.
SCENARIOS = {
    "short-chat": [(200, 20, 500)],
    "medium": [(200, 50, 2000)],
    "long-document": [(100, 200, 8000)],
    "mixed": [(30, 10, 200), (30, 200, 2000), (20, 1000, 6000)],
}


def workload(name: str, output_range: tuple[int, int], seed: int) -> list[tuple[int, int]]:
    """(prompt length, output length) per request, in arrival order."""
    rng = random.Random(seed)
    requests = [(rng.randint(lo, hi), rng.randint(*output_range))
                for count, lo, hi in SCENARIOS[name] for _ in range(count)]
    rng.shuffle(requests)
    return requests


def paged(requests: list[tuple[int, int]], pool_tokens: int, block_size: int,
          max_batched: int) -> dict[str, float]:
    max_len = max(p + o for p, o in requests)
    manager = BlockManager(pool_tokens // block_size, block_size,
                           watermark_blocks=max(1, pool_tokens // block_size // 100))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=max_batched,
                                          max_model_len=max_len), manager)
    for i, (prompt_len, output_len) in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        scheduler.add(SequenceGroup(str(i), [Sequence(i, [7] * prompt_len)], params))
    utilization, steps = 0.0, 0
    while scheduler.has_unfinished():
        step: StepInput = scheduler.schedule()
        samples = [Sample(seq.seq_id, 7, 0.0) for seq in step.seqs if seq.do_sample]
        scheduler.free_finished(scheduler.update(step, StepOutput(samples)))
        if manager.num_allocated_blocks:
            utilization += manager.num_stored_tokens() / (manager.num_allocated_blocks * block_size)
            steps += 1
    return {"utilization": utilization / steps, "steps": steps,
            "preemptions": scheduler.num_preemptions}


def static_steps(requests: list[tuple[int, int]], batch_size: int,
                 reserve: int) -> Iterator[tuple[int, int]]:
    """(stored tokens, reserved slots) per decode step of a pre-allocating static batcher."""
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        for t in range(1, max(o for _, o in batch) + 1):
            yield sum(p + min(t, o) for p, o in batch), len(batch) * reserve


def static(requests: list[tuple[int, int]], pool_tokens: int) -> dict[str, float]:
    reserve = max(p for p, _ in requests) + max(o for _, o in requests)
    batch_size = max(1, pool_tokens // reserve)
    ratios = [stored / reserved for stored, reserved in static_steps(requests, batch_size, reserve)]
    return {"utilization": sum(ratios) / len(ratios), "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--pool-tokens", type=int, default=262144, help="KV budget, in tokens")
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"# KV utilization, {datetime.date.today()}, {platform.platform()}")
    print(f"block_size={args.block_size} pool={args.pool_tokens} tokens, outputs "
          f"{args.output_min}-{args.output_max} tokens, ignore_eos\n")
    print("| scenario | requests | paged: stored/allocated | preemptions "
          "| static pre-allocation: stored/reserved | static batch |")
    print("|---|---|---|---|---|---|")
    for name in SCENARIOS:
        requests = workload(name, (args.output_min, args.output_max), args.seed)
        ours = paged(requests, args.pool_tokens, args.block_size, args.max_batched_tokens)
        theirs = static(requests, args.pool_tokens)
        print(f"| {name} | {len(requests)} | {ours['utilization']:.1%} | {ours['preemptions']} "
              f"| {theirs['utilization']:.1%} | {theirs['batch_size']} |")


if __name__ == "__main__":
    main()
