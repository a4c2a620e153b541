"""The embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF file) served with its
weights kept quantized, against the float32 model of the same file, and beside
llama.cpp on the same file.

1. Single-stream decode: one prompt, 128 greedy tokens, EOS ignored, at each
   `--threads` count: pagedserve with the file's Q4_1 weights (`quantization:
   auto`), pagedserve float32 (`quantization: dequantize`) and, with `--peer
   llamacpp`, llama.cpp (PyPI's llama-cpp-python, `make peer-llamacpp`, run by
   llamacpp_peer.py in its own venv and process). Tokens/s = generated tokens /
   the call's wall time, prompt included, for every system.
2. Offline throughput at 16 and 64 streams: that many prompts submitted at once,
   128 tokens each, pagedserve Q4_1 and float32, at the first thread count.

The systems alternate within each round; medians over `--rounds`. Greedy text is
compared token by token: the tokens each system's output shares with pagedserve
Q4_1's before the first difference.

    python benchmarks/quantized.py [--threads 1 2] [--rounds 3] [--peer llamacpp]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.model import embedded

PEER = Path(__file__).parent / ".venvs" / "llamacpp" / "bin" / "python"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ["a lighthouse", "a river", "a mountain", "a city at night", "a small robot",
          "an old library", "a garden", "the sea"]


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def run_ours(llm: LLM, prompts: list[list[int]], max_tokens: int, threads: int
             ) -> tuple[float, list[list[int]]]:
    torch.set_num_threads(threads)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds, [
        list(o.outputs[0].token_ids) for o in outputs]


def run_llamacpp(path: Path, prompt: list[int], max_tokens: int, threads: int
                 ) -> tuple[float, list[int]]:
    done = subprocess.run(
        [str(PEER), str(Path(__file__).parent / "llamacpp_peer.py"), "--model", str(path),
         "--prompt-ids", json.dumps(prompt), "--max-tokens", str(max_tokens),
         "--threads", str(threads)], capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return len(answer["tokens"]) / answer["seconds"], answer["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--peer", choices=["none", "llamacpp"], default="none")
    parser.add_argument("--out", default="benchmarks/results/quantized.json")
    args = parser.parse_args()
    if args.peer == "llamacpp" and not PEER.exists():
        raise SystemExit(f"--peer llamacpp needs llama.cpp's venv at {PEER.parent.parent}: run "
                         "`make peer-llamacpp`")
    path = embedded.fetch(embedded.DEFAULT)
    engine = dict(device="cpu", dtype="float32", max_model_len=1024, num_gpu_blocks=1200,
                  max_num_seqs=64, cpu_threads=max(args.threads))
    systems = {"pagedserve Q4_1": LLM(str(path), quantization="auto", **engine),
               "pagedserve float32": LLM(str(path), quantization="dequantize", **engine)}
    tokenizer = systems["pagedserve Q4_1"].get_tokenizer()
    prompt = tokenizer.encode(PROMPT)
    streams = {count: [tokenizer.encode(f"Write a short story about {TOPICS[i % len(TOPICS)]}"
                                        f" (story {i}).") for i in range(count)]
               for count in args.streams}
    for llm in systems.values():  # warm-up
        run_ours(llm, [prompt], 8, args.threads[0])
    names = list(systems) + (["llama.cpp"] if args.peer == "llamacpp" else [])
    single: dict[tuple[str, int], list[float]] = {}
    texts: dict[str, list[int]] = {}
    offline: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for threads in args.threads:
            for name in order:
                if name == "llama.cpp":
                    rate, tokens = run_llamacpp(path, prompt, args.max_tokens, threads)
                else:
                    rate, (tokens,) = run_ours(systems[name], [prompt], args.max_tokens, threads)
                single.setdefault((name, threads), []).append(rate)
                texts[name] = tokens
                print(f"  [{round_ + 1}/{args.rounds}] {name:20s} {threads} thread(s) "
                      f"{rate:6.1f} tok/s", flush=True)
        for count, prompts in streams.items():
            for name in [n for n in order if n in systems]:
                rate, _ = run_ours(systems[name], prompts, args.max_tokens, args.threads[0])
                offline.setdefault((name, count), []).append(rate)
                print(f"  [{round_ + 1}/{args.rounds}] {name:20s} {count} streams "
                      f"{rate:6.1f} tok/s", flush=True)
    median = {key: statistics.median(values) for key, values in single.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"\n### Quantized weights ({datetime.date.today().isoformat()})\n")
    print(f"{cpu}, torch {torch.__version__}; {path.name}; medians of {args.rounds} rounds\n")
    print("| system | threads | single-stream tok/s | pagedserve Q4_1 / it | greedy tokens "
          f"shared with Q4_1 (of {args.max_tokens}) |")
    print("|---|---|---|---|---|")
    ours = texts["pagedserve Q4_1"]
    for (name, threads), rate in median.items():
        ratio = median[("pagedserve Q4_1", threads)] / rate
        print(f"| {name} | {threads} | {rate:.1f} | {ratio:.2f}x | "
              f"{shared_prefix(ours, texts[name])} |")
    print("\n| system | streams | tok/s | vs its single stream | vs llama.cpp single stream |")
    print("|---|---|---|---|---|")
    threads = args.threads[0]
    for (name, count), values in offline.items():
        rate = statistics.median(values)
        peer = median.get(("llama.cpp", threads))
        print(f"| {name} | {count} | {rate:.1f} | {rate / median[(name, threads)]:.2f}x | "
              f"{f'{rate / peer:.2f}x' if peer else '-'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "machine": cpu, "date": datetime.date.today().isoformat(),
        "single": [{"system": n, "threads": t, "tok_s": v} for (n, t), v in single.items()],
        "offline": [{"system": n, "streams": c, "tok_s": v} for (n, c), v in offline.items()],
        "greedy_shared": {name: shared_prefix(ours, tokens) for name, tokens in texts.items()},
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
