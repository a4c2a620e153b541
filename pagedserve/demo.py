"""Offline generation on a config's model, printing generations and KV memory stats.

    python -m pagedserve.demo                          # the embedded default model
    python -m pagedserve.demo configs/tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
import json

from pagedserve import LLM, SamplingParams
from pagedserve.config import DEFAULT_CONFIG

PROMPTS = [
    "The quick brown fox",
    "In a paged KV cache, every sequence",
    "Once upon a time",
    "The capital of France is",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                        help="YAML config file (see configs/); default: the embedded model")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    llm = LLM.from_config(args.config)
    params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
              SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=1),
              SamplingParams(temperature=0.7, top_k=40, max_tokens=args.max_tokens, stop=["."]),
              SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=1.3)]
    print(f"model: {llm.engine.info.model_dir}")
    print("KV pool before:", json.dumps(llm.get_memory_stats()))
    outputs = llm.generate(PROMPTS, params)
    outputs += llm.chat([{"role": "user", "content": "What is paged attention?"}],
                        SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for output in outputs:
        completion = output.outputs[0]
        prompt = output.prompt or llm.get_tokenizer().decode(output.prompt_token_ids)
        print(f"\nprompt: {prompt!r}\n  -> {completion.text!r}"
              f"\n     {len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason}")
    print("\nKV pool after:", json.dumps(llm.get_memory_stats(), indent=2))


if __name__ == "__main__":
    main()
