"""Multi-LoRA throughput: adapters mixed in every batch, against base-only requests on the
same engine and against HF PEFT serving each adapter's requests in static batches.

The model is the embedded default (SmolLM2-135M-Instruct, float32, CPU); the
adapters are random (testing/lora.write_random_adapter: PEFT's files, with A
and B both non-zero, so they change the output) of rank `--rank` on all seven
projections. Each scenario has
`--requests` requests with seeded prompt and output lengths, each request's
adapter drawn uniformly or by Zipf (s = 1.1) from the scenario's adapters.

* pagedserve, adapters: `LLM.generate` over every request at once, each with its
  adapter (`max_loras` device slots, at most `--max-loras`); its LoRA overhead
  is against
* pagedserve, base: the same requests with no adapter, on the same engine;
* HF PEFT: one PeftModel holding every adapter; for each adapter in turn,
  `set_adapter` and `generate` over its requests in static batches of at most
  `--hf-batch` (left-padded, run to the batch's longest output), the baseline
  S-LoRA measures against.

Outputs are greedy with EOS ignored, so every request produces exactly its
own output length; throughput is those output tokens over wall time. The
systems alternate within each round, and each figure is the median over
`--rounds` rounds (the machine is shared and noisy). pagedserve's tokens are
checked against HF PEFT's request by request (a match count: batch
composition may flip a near-tie).

    python benchmarks/lora.py [--rounds 3] [--adapters 1 8 32 128] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.model import embedded
from pagedserve.testing.lora import write_random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ZIPF_S = 1.1


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def workload(args, num_adapters: int, skew: str) -> list[tuple[list[int], int, int]]:
    """(prompt ids, output length, adapter index) per request, seeded."""
    rng = random.Random(f"{args.seed}-{num_adapters}-{skew}")
    weights = ([1.0] * num_adapters if skew == "uniform"
               else [1.0 / (rank + 1) ** ZIPF_S for rank in range(num_adapters)])
    requests = []
    for _ in range(args.requests):
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(*args.prompt_len))]
        adapter = rng.choices(range(num_adapters), weights)[0]
        requests.append((prompt, rng.randint(*args.output_len), adapter))
    return requests


def run_pagedserve(llm: LLM, requests, adapters: list[LoRARequest] | None):
    prompts = [{"prompt_token_ids": p} for p, _, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
              for _, o, _ in requests]
    loras = None if adapters is None else [adapters[a] for _, _, a in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return time.perf_counter() - start, [out.outputs[0].token_ids for out in outs]


def run_hf_peft(model, requests, names: list[str], batch_size: int, pad_id: int):
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for adapter, name in enumerate(names):
            mine = [(i, r) for i, r in enumerate(requests) if r[2] == adapter]
            if not mine:
                continue
            model.set_adapter(name)
            for first in range(0, len(mine), batch_size):
                batch = mine[first:first + batch_size]
                width = max(len(p) for _, (p, _, _) in batch)
                new = max(o for _, (_, o, _) in batch)
                ids = torch.tensor([[pad_id] * (width - len(p)) + p for _, (p, _, _) in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p)
                                     for _, (p, _, _) in batch])
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=pad_id,
                                     eos_token_id=-1)
                for (index, (_, out_len, _)), row in zip(batch, out, strict=True):
                    tokens[index] = row[width:width + out_len].tolist()
    return time.perf_counter() - start, [tokens[i] for i in range(len(requests))]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--skews", nargs="+", default=["uniform", "zipf"],
                        choices=["uniform", "zipf"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=32, help="device slots, at most")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 96])
    parser.add_argument("--output-len", type=int, nargs=2, default=[24, 48])
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--hf-at", type=int, nargs="*", default=[8, 32],
                        help="adapter counts at which HF PEFT runs too (it is slow)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.skews, args.rounds, args.requests = [1, 4], ["uniform"], 1, 12
        args.output_len, args.hf_at = [4, 8], [4]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf = embedded.fetch(embedded.DEFAULT)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    root = Path(args.out).parent / "lora-adapters"
    most = max(args.adapters)
    paths = [root / f"r{args.rank}-{i}" for i in range(most)]
    for i, path in enumerate(paths):
        if not (path / "adapter_model.safetensors").exists():
            write_random_adapter(hf_model.config, path, args.rank, TARGETS, seed=i)
    adapters = [LoRARequest(f"adapter{i}", i + 1, str(path)) for i, path in enumerate(paths)]
    command = "python " + " ".join(["benchmarks/lora.py", *sys.argv[1:]])
    print(f"# Multi-LoRA, {datetime.date.today().isoformat()}\n{command}\n"
          f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads\n"
          f"SmolLM2-135M float32; adapters rank {args.rank} on {len(TARGETS)} projections; "
          f"{args.requests} requests, prompts {args.prompt_len}, outputs {args.output_len}, "
          f"greedy; {args.rounds} rounds, medians\n", flush=True)

    from peft import PeftModel

    peft_model = None
    rows = []
    for count in args.adapters:
        slots = min(count, args.max_loras)
        llm = LLM(**_engine(slots, args.rank, count))
        for adapter in adapters[:count]:  # registered (files read and checked) before timing
            llm.engine.add_lora(adapter)
        run_pagedserve(llm, workload(args, count, "uniform")[:8], adapters[:count])  # warm up
        for skew in args.skews:
            requests = workload(args, count, skew)
            outputs = sum(o for _, o, _ in requests)
            times: dict[str, list[float]] = {"lora": [], "base": [], "hf": []}
            with_hf = count in args.hf_at
            if with_hf and peft_model is None:
                peft_model = PeftModel.from_pretrained(hf_model, str(paths[0]),
                                                       adapter_name="adapter0")
            if with_hf:
                for i in range(count):
                    if f"adapter{i}" not in peft_model.peft_config:
                        peft_model.load_adapter(str(paths[i]), adapter_name=f"adapter{i}")
            ours = theirs = None
            for _ in range(args.rounds):
                seconds, ours = run_pagedserve(llm, requests, adapters[:count])
                times["lora"].append(seconds)
                times["base"].append(run_pagedserve(llm, requests, None)[0])
                if with_hf:
                    seconds, theirs = run_hf_peft(peft_model, requests,
                                                  [f"adapter{i}" for i in range(count)],
                                                  args.hf_batch, hf_model.config.pad_token_id
                                                  or 0)
                    times["hf"].append(seconds)
            stats = llm.get_memory_stats()
            row = {"adapters": count, "skew": skew, "max_loras": slots,
                   "distinct_adapters": len({a for _, _, a in requests}),
                   "output_tokens": outputs,
                   **{f"{k}_tok_s": outputs / statistics.median(v) for k, v in times.items()
                      if v},
                   "rounds": {k: v for k, v in times.items() if v},
                   "lora_loads": stats["lora_loads"], "lora_evictions": stats["lora_evictions"]}
            row["overhead"] = 1 - row["lora_tok_s"] / row["base_tok_s"]
            line = (f"{count:4d} adapters {skew:7s} ({row['distinct_adapters']:3d} used, "
                    f"{slots} slots): adapters {row['lora_tok_s']:7.1f} tok/s, base "
                    f"{row['base_tok_s']:7.1f} tok/s, overhead {row['overhead']:+.1%}")
            if with_hf:
                row["hf_peft_speedup"] = row["lora_tok_s"] / row["hf_tok_s"]
                row["match_hf"] = sum(a == b for a, b in zip(ours, theirs, strict=True))
                line += (f"; HF PEFT {row['hf_tok_s']:6.1f} tok/s -> x{row['hf_peft_speedup']:.2f}"
                         f", tokens equal {row['match_hf']}/{len(requests)}")
            print(line, flush=True)
            rows.append(row)
        llm.shutdown()
    Path(args.out).write_text(json.dumps({"command": command, "cpu": cpu_model(),
                                          "date": datetime.date.today().isoformat(),
                                          "args": vars(args), "rows": rows}, indent=1))


def _engine(slots: int, rank: int, count: int) -> dict:
    return dict(embedded=embedded.DEFAULT, dtype="float32", device="cpu",
                max_model_len=1024, kv_cache_memory_gb=0.5, max_num_seqs=64,
                max_num_batched_tokens=1024, enable_lora=True, max_lora_rank=rank,
                max_loras=slots, max_cpu_loras=max(slots, count))


if __name__ == "__main__":
    main()
