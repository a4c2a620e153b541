"""llama.cpp's side of `benchmarks/quantized.py --peer llamacpp`, run in its own venv.

`make peer-llamacpp` builds that venv (benchmarks/.venvs/llamacpp: PyPI's
llama-cpp-python, compiled for this CPU). quantized.py starts this script once
per measurement with the GGUF file, the prompt's token ids and the thread count;
it loads the file, warms up, then generates greedily (top-k 1) from the prompt,
EOS ignored, and prints one JSON line: the seconds the generation took (prompt
included, as pagedserve's `LLM.generate` is timed) and the tokens it made.

    benchmarks/.venvs/llamacpp/bin/python benchmarks/llamacpp_peer.py \\
        --model FILE.gguf --prompt-ids '[1, 2, 3]' --max-tokens 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-ids", required=True, help="a JSON list of token ids")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from llama_cpp import Llama  # only in the peer's venv

    prompt = json.loads(args.prompt_ids)
    llm = Llama(model_path=args.model, n_ctx=len(prompt) + args.max_tokens + 8,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False)

    def generate() -> tuple[float, list[int]]:
        tokens: list[int] = []
        start = time.perf_counter()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == args.max_tokens:
                break
        return time.perf_counter() - start, tokens

    generate()  # warm-up
    seconds, tokens = generate()
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


if __name__ == "__main__":
    main()
