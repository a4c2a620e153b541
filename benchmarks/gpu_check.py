"""The GPU check: what a short loan of a CUDA GPU is spent on, most valuable first.

1. kernel-tests: the compiled Triton kernels, CUDA graphs and LoRA kernels against
   their references (`TRITON_INTERPRET=0 pytest tests/kernels/test_triton_*.py ...`);
2. greedy: the offline LLM on the GPU (compiled kernels, CUDA graphs, on-GPU
   sampling) gives HF transformers' greedy tokens on a tiny random-weight model;
3. gpu-e2e: the end-to-end figures (benchmarks/gpu_e2e.py, shortened);
4. speculative: n-gram, a draft model and EAGLE heads on the GPU against plain
   decoding (benchmarks/gpu_speculative.py);
5. attention-kernels, lora-kernels: the kernel sweeps.

Each step runs in its own process under its own time limit, and the whole run
fits in --budget-s. Every step appends its output to gpu-check.log and rewrites
summary.json (status and seconds of each step) as it finishes, so a run cut
short still returns what it measured. Results go to --results: $OUT when set,
else benchmarks/results/gpu-check-<date>/; six files at most.

    make gpu-check                                # on the GPU machine, from the tree's root
    python benchmarks/gpu_check.py --dry-run      # anywhere: every step's script imports,
        # the tests are collected, the benchmarks run their smoke modes on the CPU

The GPU machine's image lacks some of pagedserve's dependencies; `make gpu-bundle`
brings them (benchmarks/gpu-bundle.txt), `make gpu-check` installs them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/kernels/test_triton_attention.py", "tests/kernels/test_triton_cache_ops.py",
                "tests/worker/test_cuda_graph.py", "tests/kernels/test_triton_lora.py",
                "tests/kernels/test_fused_moe.py", "tests/kernels/test_fp8_kv_kernels.py",
                "tests/kernels/test_triton_quant_gemm.py"]
# The greedy check's prompts (lengths) and its tokens per prompt.
GREEDY_PROMPT_LENS = [1, 5, 17, 33, 64]
GREEDY_MAX_TOKENS = 16


@dataclass(frozen=True)
class Step:
    """One process of the check: its command on a GPU, and its cheap form for --dry-run."""

    name: str
    command: list[str]
    dry_command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    dry_env: dict[str, str] = field(default_factory=dict)


def steps(results: Path) -> list[Step]:
    python = sys.executable
    # -rfE: each failure's test and error in the summary, which a timeout's SIGINT prints too.
    pytest = [python, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
              *KERNEL_TESTS]
    # On the GPU machine (pytest-xdist in its image), the kernels compile in 8 processes.
    parallel = ["-n", "8"]
    greedy = [python, str(Path(__file__).resolve()), "--greedy"]
    e2e = [python, "benchmarks/gpu_e2e.py", "--out", str(results / "gpu_e2e.json")]
    speculative = [python, "benchmarks/gpu_speculative.py",
                   "--out", str(results / "speculative.json")]
    attention = [python, "benchmarks/attention_kernels.py",
                 "--out", str(results / "attention_kernels.json")]
    lora = [python, "benchmarks/lora_kernels.py", "--out", str(results / "lora_kernels.json")]
    compiled, interpreted = {"TRITON_INTERPRET": "0"}, {"TRITON_INTERPRET": "1"}
    # Limits from an H200 (BENCHMARKS.md): kernel tests 134 s, greedy 21 s, the sweeps
    # 11 s each; gpu-e2e reached the last scenario's HF run at 150 s. The speculative
    # step (five engines, one at a time) has not run on a GPU yet.
    return [
        Step("kernel-tests", [*pytest, *parallel], [*pytest, "--collect-only"], 170,
             compiled, interpreted),
        Step("greedy", [*greedy, "cuda"], [*greedy, "cpu"], 40, compiled, interpreted),
        # The scenarios at a tenth of their requests, fewer pair requests, shorter decode runs.
        # HF's generate_batch is left out: the slowest peer, and static generate stands in.
        Step("gpu-e2e", [*e2e, "--requests-scale", "0.1", "--pair-requests", "16",
                         "--decode-steps", "12", "--skip-hf-batch"],
             [*e2e, "--tiny", "--device", "cpu"], 240,
             compiled, interpreted),
        Step("speculative", [*speculative], [*speculative, "--tiny", "--device", "cpu"], 90,
             compiled, interpreted),
        Step("attention-kernels", [*attention, "--iters", "20"], [*attention, "--smoke"], 70,
             compiled, interpreted),
        Step("lora-kernels", [*lora, "--iters", "20"], [*lora, "--smoke"], 45,
             compiled, interpreted),
    ]


def run_step(step: Step, dry_run: bool, timeout_s: float, log: Path) -> str:
    """Run one step, its output appended to the log; 'passed', 'failed', 'timeout' or
    'missing' (a script or test file it names is not in the tree)."""
    command = step.dry_command if dry_run else step.command
    missing = [arg for arg in command if arg.endswith(".py") and not (ROOT / arg).is_file()]
    if missing:
        with log.open("a") as out:
            out.write(f"\n## {step.name}: missing {', '.join(missing)}\n")
        return "missing"
    env = dict(os.environ, **(step.dry_env if dry_run else step.env))
    env.setdefault("HF_HUB_OFFLINE", "1")  # local models only: no waiting on a hub
    # The tree's root, for pagedserve (a script's own folder comes first by itself).
    path = [str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    with log.open("a") as out:
        out.write(f"\n## {step.name}: {' '.join(command)} (limit {timeout_s:.0f} s)\n")
        out.flush()
        # A session of its own, so that a timeout ends the step's children too.
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then prints the failures it has seen so far.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.write(f"\n## {step.name}: stopped at its limit of {timeout_s:.0f} s\n")
            return "timeout"
    return "passed" if code == 0 else "failed"


def run(results: Path, dry_run: bool, budget_s: float, only: list[str] | None) -> int:
    results.mkdir(parents=True, exist_ok=True)
    log, summary_path = results / "gpu-check.log", results / "summary.json"
    started = time.monotonic()
    summary = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   dry_run=dry_run, budget_s=budget_s, python=sys.version.split()[0], steps=[])
    log.write_text(f"# gpu-check {summary['date']}{' (dry run)' if dry_run else ''}\n")
    for step in steps(results):
        if only and step.name not in only:
            continue
        left = budget_s - (time.monotonic() - started)
        if left < 5:
            summary["steps"].append(dict(name=step.name, status="not run", seconds=0.0))
        else:
            start = time.monotonic()
            status = run_step(step, dry_run, min(step.timeout_s, left), log)
            summary["steps"].append(dict(name=step.name, status=status,
                                         seconds=round(time.monotonic() - start, 1)))
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{step.name}: {summary['steps'][-1]['status']} "
              f"({summary['steps'][-1]['seconds']:.0f} s)", flush=True)
    print(f"results in {results}")
    return 0 if all(s["status"] == "passed" for s in summary["steps"]) else 1


def greedy_check(device_name: str) -> int:
    """pagedserve's greedy tokens on `device_name` against HF's on the same random weights."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from pagedserve import LLM, SamplingParams
    from pagedserve.testing import build_random_model

    device = torch.device(device_name)
    with tempfile.TemporaryDirectory(prefix="pagedserve-greedy-") as tmp:
        model_dir = build_random_model(Path(tmp) / "llama-gqa", arch="llama",
                                       num_key_value_heads=1)
        llm = LLM(str(model_dir), device=device_name, dtype="float32", block_size=16,
                  max_model_len=128, num_gpu_blocks=64, max_num_seqs=8)
        graphs = llm.engine.executor.worker.runner.graphs
        print(f"pagedserve on {device_name}: CUDA graphs "
              f"{graphs.sizes if graphs is not None else 'off'}", flush=True)
        vocab = llm.engine.info.vocab_size
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(6, vocab, (n,), generator=generator).tolist()
                   for n in GREEDY_PROMPT_LENS]
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        hf.eval()
        mismatches = 0
        for prompt, output in zip(prompts, outputs, strict=True):
            with torch.inference_mode():
                expected = hf.generate(torch.tensor([prompt], device=device), do_sample=False,
                                       max_new_tokens=GREEDY_MAX_TOKENS)[0, len(prompt):].tolist()
            got = output.outputs[0].token_ids
            same = list(got) == expected
            mismatches += not same
            print(f"prompt of {len(prompt):3d} tokens: {'same' if same else 'DIFFERENT'}"
                  + ("" if same else f"\n  pagedserve {list(got)}\n  HF         {expected}"))
    print(f"greedy on {device_name}: {len(prompts) - mismatches} of {len(prompts)} prompts "
          "give HF's tokens")
    return 1 if mismatches else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_results = (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks/results" / f"gpu-check-{datetime.date.today()}")
    parser.add_argument("--results", type=Path, default=default_results)
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: collect the tests, smoke-run the benchmarks on the CPU")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the whole run's limit; each step also has its own")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--greedy", metavar="DEVICE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.greedy:
        return greedy_check(args.greedy)
    return run(args.results.resolve(), args.dry_run, args.budget_s, args.only)


if __name__ == "__main__":
    sys.exit(main())
