"""Real third-party clients against a running pagedserve: lm-eval-harness and guidellm.

With `make serve` (or `pagedserve serve CONFIG`) running, this runs, as their
users run them:

1. lm-eval-harness `local-completions` on two tasks in benchmarks/clients/:
   - `pagedserve_mc`: 40 multiple-choice questions scored by loglikelihood
     (token-id prompts with `echo`, `logprobs: 1`, `max_tokens: 1`);
   - `pagedserve_gen_stops`: 8 arithmetic questions generated until any of six
     stop strings.
2. guidellm's OpenAI backend, streaming: text completions at concurrency 4,
   and chat completions one at a time (`stream_options.continuous_usage_stats`).

Each client lives in its own virtual environment (`--venvs`, made on first use
with torch 2.13.0 installed first), since their pins clash with the project's.
The tokenizer is the one the server names as its model's `root` in /v1/models;
nothing is fetched from a model hub. It prints a markdown summary for
BENCHMARKS.md and writes everything to `--out-dir`.

    python benchmarks/clients.py [--url http://127.0.0.1:8000] [--requests 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = HERE / "clients"
CLIENTS = {"lm-eval": ["lm-eval[api]==0.4.13", "transformers>=5.0"],
           "guidellm": ["guidellm==0.8.1"]}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def venv(root: Path, name: str) -> Path:
    """The client's virtual environment, made once: torch's local CPU build first."""
    path = root / name
    python = path / "bin" / "python"
    if not (path / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, *CLIENTS[name]], check=True)
        (path / ".installed").touch()
    return path / "bin"


def model_card(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
        return json.load(response)["data"][0]


def run_lm_eval(bin_dir: Path, url: str, card: dict, out: Path) -> dict:
    args = (f"model={card['id']},base_url={url}/v1/completions,tokenizer={card['root']},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    command = [str(bin_dir / "lm_eval"), "--model", "local-completions", "--model_args", args,
               "--tasks", "pagedserve_mc,pagedserve_gen_stops", "--include_path", str(TASKS),
               "--output_path", str(out / "lm-eval")]
    subprocess.run(command, check=True, cwd=TASKS, env={**os.environ, **OFFLINE})
    (result,) = (out / "lm-eval").rglob("results_*.json")
    return {"command": " ".join(command), "results": json.loads(result.read_text())["results"]}


def run_guidellm(bin_dir: Path, url: str, card: dict, out: Path, name: str, request_format: str,
                 profile: str, requests: int, prompt_tokens: int, output_tokens: int) -> dict:
    path = out / f"guidellm-{name}.json"
    command = [str(bin_dir / "guidellm"), "run",
               "--backend", f"kind=openai_http,target={url},request_format={request_format}",
               "--profile", profile, "--constraint", f"kind=max_requests,count={requests}",
               "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                         f"output_tokens={output_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={card['root']}",
               "--output", f"kind=json,path={path}", "--disable-console-interactive"]
    subprocess.run(command, check=True, cwd=out, env={**os.environ, **OFFLINE})
    (benchmark,) = json.loads(path.read_text())["benchmarks"]
    metrics = benchmark["metrics"]

    def median(metric: str) -> float:
        return metrics[metric]["successful"]["median"]

    return {"command": " ".join(command), "requests": metrics["request_totals"],
            "ttft_ms": median("time_to_first_token_ms"),
            "itl_ms": median("inter_token_latency_ms"),
            "output_tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=40, help="guidellm requests per run")
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results" / "clients")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    card = model_card(args.url)
    lm_eval = run_lm_eval(venv(args.venvs, "lm-eval"), args.url, card, args.out_dir)
    guidellm = venv(args.venvs, "guidellm")
    text = run_guidellm(guidellm, args.url, card, args.out_dir, "text", "/v1/completions",
                        "kind=concurrent,streams=4", args.requests, 256, 64)
    chat = run_guidellm(guidellm, args.url, card, args.out_dir, "chat", "/v1/chat/completions",
                        "kind=synchronous", max(1, args.requests // 4), 64, 32)
    summary = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
               platform.machine(), "model": card["id"], "lm_eval": lm_eval,
               "guidellm": {"text": text, "chat": chat}}
    (args.out_dir / "clients.json").write_text(json.dumps(summary, indent=2))
    results = lm_eval["results"]
    print("\n| lm-eval task | metric | value |\n|---|---|---|")
    print(f"| pagedserve_mc (40) | acc | {results['pagedserve_mc']['acc,none']:.3f} |")
    print(f"| pagedserve_mc (40) | acc_norm | {results['pagedserve_mc']['acc_norm,none']:.3f} |")
    gen = results["pagedserve_gen_stops"]
    print(f"| pagedserve_gen_stops (8, 6 stops) | exact_match | "
          f"{gen['exact_match,first_number']:.3f} |")
    print("\n| guidellm run | requests ok / errored | TTFT p50 ms | ITL p50 ms | output tok/s |")
    print("|---|---|---|---|---|")
    for name, run in (("text, 4 streams, 256 -> 64", text), ("chat, 1 stream, 64 -> 32", chat)):
        counts = run["requests"]
        print(f"| {name} | {counts['successful']} / {counts['errored']} | {run['ttft_ms']:.0f} | "
              f"{run['itl_ms']:.1f} | {run['output_tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
