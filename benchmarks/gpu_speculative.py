"""Speculative decoding on one GPU against plain decoding, same dummy weights.

The model is gpu_e2e.py's (Llama-3-8B-shaped, or its tiny config with --tiny),
its weights drawn on the device. The same greedy requests (batch 1, then 8 at
once) run on a plain engine, then with each method, one engine (and its draft)
on the device at a time:

* ngram: prompt lookup;
* draft_model: the model as its own draft (the same dummy weights): nearly
  every draft is kept where the draft's KV and passes are right;
* eagle, eagle3: random heads of one layer of the model's shape, in config-only
  directories: their drafts are refused, but they run.

Each row: acceptance, tokens/s against the plain engine's, and how many
leading tokens each request's output shares with the plain engine's (in bf16
the verified rows go through the prefill kernel, so a near-tie may part them),
and the blocks still held at the end.

    python benchmarks/gpu_speculative.py                     # on a GPU
    python benchmarks/gpu_speculative.py --tiny --device cpu # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from gpu_e2e import BLOCK, agreed_prefixes, median, model_config_dir, random_requests
from gpu_e2e import run_pagedserve as run

from pagedserve import LLM
from pagedserve.math_utils import cdiv

METHODS = {
    "ngram": lambda model_dir, heads: {"method": "ngram", "num_speculative_tokens": 4,
                                       "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "draft_model": lambda model_dir, heads: {"model": str(model_dir),
                                             "num_speculative_tokens": 4},
    "eagle": lambda model_dir, heads: {"method": "eagle", "model": str(heads["eagle"]),
                                       "num_speculative_tokens": 3},
    "eagle3": lambda model_dir, heads: {"method": "eagle3", "model": str(heads["eagle3"]),
                                        "num_speculative_tokens": 3},
}


def head_config_dirs(model_dir: Path) -> dict[str, Path]:
    """Config-only EAGLE and EAGLE-3 heads of the model's shape (weights drawn: dummy)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = {}
    for method, extra in (("eagle", {"architectures": ["LlamaForCausalLM"]}),
                          ("eagle3", {"architectures": ["LlamaForCausalLMEagle3"],
                                      "draft_vocab_size": min(32000, config["vocab_size"])})):
        folder = Path(tempfile.mkdtemp(prefix=f"pagedserve-gpu-spec-{method}-"))
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1,
                                                        **extra}))
        heads[method] = folder
    return heads


def engine(model_dir: Path, args, length: int, speculative: dict | None = None) -> LLM:
    """An engine of room for eight requests of `length` tokens, drafts' lookahead included."""
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    return LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True,
               device=args.device, dtype=dtype, block_size=BLOCK, max_model_len=length,
               num_gpu_blocks=9 * length // BLOCK, max_num_seqs=8, swap_space=0,
               speculative_config=speculative)


def release(llm: LLM) -> dict:
    """Shut the engine down (the device holds one at a time); its blocks still held."""
    memory = llm.get_memory_stats()
    llm.shutdown()
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"blocks_in_use_at_end": memory["total_blocks"] - memory["free_blocks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model: a smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=int, default=96, help="output tokens a request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gpu_speculative.json")
    args = parser.parse_args()
    output, prompt = (12, 16) if args.tiny else (args.output, 64)
    model_dir = model_config_dir(args.tiny)
    length = cdiv(prompt + output + 16, BLOCK) * BLOCK  # room for the lookahead
    rng = random.Random(args.seed)

    plain = engine(model_dir, args, length)
    vocab = plain.engine.info.vocab_size
    batches = {size: random_requests(rng, vocab, size, prompt, output) for size in (1, 8)}
    run(plain, batches[1])  # warm-up: kernels compile here
    plain_runs = {size: run(plain, requests) for size, requests in batches.items()}
    report: dict = {"args": vars(args), "plain": release(plain), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads = head_config_dirs(model_dir)
    print("## speculative decoding against plain, greedy", flush=True)
    for method, config in METHODS.items():
        spec = engine(model_dir, args, length, config(model_dir, heads))
        run(spec, batches[1])
        before = spec.get_spec_decode_stats()
        row: dict = {"method": method}
        for size, requests in batches.items():
            seconds, tokens = run(spec, requests)
            plain_s, plain_tokens = plain_runs[size]
            agreed = agreed_prefixes(tokens, plain_tokens, requests)
            useful = sum(o for _, o in requests)
            row[f"batch_{size}"] = dict(
                tokens_per_s=useful / seconds, plain_tokens_per_s=useful / plain_s,
                equal=sum(a == o for a, (_, o) in zip(agreed, requests, strict=True)),
                requests=len(requests), agreed_median=median(agreed))
        after = spec.get_spec_decode_stats()
        drafted = after["draft_tokens"] - before["draft_tokens"]
        row["acceptance_rate"] = ((after["accepted_tokens"] - before["accepted_tokens"])
                                  / drafted if drafted else 0.0)
        row.update(release(spec))
        report["rows"].append(row)
        out.write_text(json.dumps(report, indent=2, default=str))  # a run cut short keeps it
        one, eight = row["batch_1"], row["batch_8"]
        print(f"  {method:11s} acceptance {row['acceptance_rate']:.2f}; batch 1 "
              f"{one['tokens_per_s']:.0f} tok/s "
              f"({one['tokens_per_s'] / one['plain_tokens_per_s']:.2f}x plain), equal "
              f"{one['equal']}/{one['requests']}; batch 8 "
              f"{eight['tokens_per_s'] / eight['plain_tokens_per_s']:.2f}x, equal "
              f"{eight['equal']}/{eight['requests']} (agreed median {eight['agreed_median']})",
              flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
