"""Start-up of a tensor-parallel engine whose ranks run on other nodes: each rank
reading its slices of the safetensors files where it runs (`weights_transfer:
files`), against the engine reading them once and the ranks taking them from
Ray's object store (`object_store`).

A simulated cluster on this machine (`ray.cluster_utils.Cluster`): the head, and
two worker nodes of one CPU each; the head's CPUs are held, so the TP=2 ranks
(STRICT_SPREAD, a CPU each) start on the two worker nodes. The model is the
throughput benchmark's 56M-parameter Llama, float32 (226 MB of safetensors).
Timed: `LLM(...)` from the call to a ready engine (placement, the ranks' start,
the weights, the KV pools), in rounds that alternate the two ways; the greedy
tokens of one prompt are compared.

    python benchmarks/weights_transfer.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import remove_placement_group
from workloads import MODEL

from pagedserve import LLM, SamplingParams
from pagedserve.model.checkpoint_files import checkpoint_bytes
from pagedserve.testing import cached_random_model
from pagedserve.testing.nodes import hold_cpus

WAYS = ("files", "object_store")


def start(model_dir: Path, way: str) -> tuple[float, list[int]]:
    began = time.perf_counter()
    llm = LLM(str(model_dir), tensor_parallel_size=2, placement_strategy="STRICT_SPREAD",
              worker_cpus=1.0, distributed_executor_backend="ray", weights_transfer=way,
              device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks=64,
              skip_tokenizer_init=True)
    seconds = time.perf_counter() - began
    try:
        out = llm.generate([{"prompt_token_ids": list(range(10, 40))}],
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)
        return seconds, list(out[0].outputs[0].token_ids)
    finally:
        llm.shutdown()


def _cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")), platform.processor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/weights.json"))
    args = parser.parse_args()
    model_dir = cached_random_model("bench-llama-50m", arch="llama", **MODEL)
    size = checkpoint_bytes(model_dir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=1 << 30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    held = hold_cpus(2)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    tokens: dict[str, list[int]] = {}
    try:
        start(model_dir, "files")  # warm-up: imports, the page cache, Ray's worker pool
        for round_ in range(args.rounds):
            for way in WAYS if round_ % 2 == 0 else reversed(WAYS):
                took, tokens[way] = start(model_dir, way)
                seconds[way].append(took)
                print(f"  [{round_ + 1}/{args.rounds}] {way:<13} {took:6.2f} s", flush=True)
    finally:
        remove_placement_group(held)
        ray.shutdown()
        cluster.shutdown()
    median = {way: statistics.median(values) for way, values in seconds.items()}
    print(f"\n{size / 2**20:.0f} MiB of safetensors, TP=2 on two worker nodes, medians of "
          f"{args.rounds}: files {median['files']:.2f} s, object_store "
          f"{median['object_store']:.2f} s ({median['object_store'] / median['files']:.2f}x); "
          f"greedy tokens equal: {tokens['files'] == tokens['object_store']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=_cpu_model(),
        safetensors_bytes=size, seconds=seconds, median_s=median,
        tokens_equal=tokens["files"] == tokens["object_store"]), indent=2))


if __name__ == "__main__":
    main()
