"""Speculative decoding: what prompt lookup buys at one stream, and what it costs at load.

Two parts, each run with its flag (both by default):

--cpu   The embedded SmolLM2-135M-Instruct on this CPU (float32, greedy), one
        request at a time: inter-token latency with n-gram speculation
        (engine.speculative) against plain decoding, alternating over --rounds
        (medians), and the acceptance. Four input-grounded tasks (editing a code
        file, summarising a text, answering from a document, reformatting a list)
        and a chat task with little to copy. The tokens of both systems are
        compared: greedy speculation must give the target's own.
--sim   The simulated H200 (configs/llama-3-8b-h200-sim.yaml: Llama-3-8B's step
        times from the roofline, model/roofline.py) at each of --batches: output
        tokens/s with n-gram speculation and with a Llama-3.2-1B-shaped draft model
        (its passes timed by the same roofline) against plain, rotating the order
        over --rounds (medians), with the measured acceptance and the share of
        steps the policy let speculate. The simulated device writes its text from
        a place its seed picks; each prompt holds that stretch of text with one
        token in --edit-every changed (an editing task: the reply copies the
        prompt, less the edits), so prompt lookup proposes from it and the edits
        refuse drafts. The simulated draft's tokens are the text's with the
        chance --draft-acceptance each (assumed: there are no draft weights).

    python benchmarks/speculative.py [--cpu] [--sim] [--rounds 3] [--k 8] [--lookup 3 5]
        [--batches 1 8 32 256] [--out benchmarks/results/speculative.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from pagedserve import LLM, SamplingParams
from pagedserve.config import load
from pagedserve.model import embedded

ROOT = Path(__file__).resolve().parent.parent
SIM_CONFIG = ROOT / "configs" / "llama-3-8b-h200-sim.yaml"
DRAFT = "meta-llama/Llama-3.2-1B-Instruct"  # its bundled preset's shape, on the simulator

CODE = (ROOT / "pagedserve" / "math_utils.py").read_text()
ARTICLE = ("The tide is the rise and fall of the sea, caused by the gravity of the Moon and "
           "the Sun acting on the rotating Earth. Most coasts see two high tides and two low "
           "tides each day. The difference between high and low water, the tidal range, is "
           "largest at new and full moon, when the Sun and Moon pull in line; these are the "
           "spring tides. At the quarter moons the pulls are at right angles and the range is "
           "smallest; these are the neap tides. In narrow bays the range can exceed fifteen "
           "metres, as in the Bay of Fundy in Canada, while the Mediterranean sees less than "
           "half a metre.")
ITEMS = ["apples, 3 kg, 4.50 euros", "bread, 2 loaves, 3.20 euros", "milk, 4 litres, 3.96 euros",
         "coffee, 500 g, 7.80 euros", "rice, 2 kg, 2.90 euros", "eggs, 12, 3.10 euros",
         "cheese, 400 g, 5.60 euros", "tomatoes, 1 kg, 2.40 euros"]
TASKS = {
    "edit code": f"Rename the function `cdiv` to `ceil_div` in this file and print the whole "
                 f"file:\n\n{CODE}",
    "summarise": f"Summarise this text in three sentences:\n\n{ARTICLE}",
    "answer from a document": f"{ARTICLE}\n\nQuote the sentences of the text above that say "
                              f"what spring and neap tides are.",
    "reformat a list": "Write this shopping list as a Markdown table with the columns item, "
                       "amount and price:\n\n" + "\n".join(ITEMS),
    "chat (little to copy)": "Write a short story about a lighthouse keeper and a cat.",
}
GROUNDED = [task for task in TASKS if task != "chat (little to copy)"]


def _spec(k: int, lookup: tuple[int, int]) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lookup[0],
            "prompt_lookup_max": lookup[1]}


def _itl(output) -> float:
    """Seconds per token after the first."""
    metrics, n = output.metrics, len(output.outputs[0].token_ids)
    return (metrics.finished_time - metrics.first_token_time) / max(1, n - 1)


def run_cpu(rounds: int, k: int, lookup: tuple[int, int], max_tokens: int) -> dict:
    path = embedded.fetch(embedded.DEFAULT)
    engine = dict(device="cpu", dtype="float32", max_model_len=2048, num_gpu_blocks=512)
    systems = {"plain": LLM(str(path), **engine),
               "ngram": LLM(str(path), **engine, speculative_config=_spec(k, lookup))}
    tokenizer = systems["plain"].get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prompts = {task: {"prompt_token_ids": tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True,
        return_dict=False)} for task, text in TASKS.items()}
    for llm in systems.values():  # warm-up
        llm.generate([prompts["summarise"]], SamplingParams(max_tokens=8), use_tqdm=False)
    itl: dict[str, dict[str, list[float]]] = {task: {s: [] for s in systems} for task in TASKS}
    tokens: dict[str, dict[str, list[int]]] = {task: {} for task in TASKS}
    spec_stats: dict[str, dict] = {}
    for round_ in range(rounds):
        order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
        for task, prompt in prompts.items():
            for name in order:
                llm = systems[name]
                before = llm.get_spec_decode_stats()
                output = llm.generate([prompt], params, use_tqdm=False)[0]
                itl[task][name].append(_itl(output))
                tokens[task][name] = list(output.outputs[0].token_ids)
                if name == "ngram":
                    after = llm.get_spec_decode_stats()
                    spec_stats[task] = {key: after[key] - before[key]
                                        for key in ("draft_tokens", "accepted_tokens")}
    results = {}
    for task in TASKS:
        plain, ngram = (statistics.median(itl[task][s]) for s in ("plain", "ngram"))
        drafted, accepted = (spec_stats[task][key] for key in ("draft_tokens", "accepted_tokens"))
        results[task] = {
            "plain_itl_ms": plain * 1e3, "ngram_itl_ms": ngram * 1e3, "speedup": plain / ngram,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "draft_tokens": drafted, "output_tokens": len(tokens[task]["ngram"]),
            "tokens_equal": tokens[task]["plain"] == tokens[task]["ngram"]}
        row = results[task]
        print(f"{task:24s} plain {row['plain_itl_ms']:6.2f} ms/token, ngram "
              f"{row['ngram_itl_ms']:6.2f} ms/token: {row['speedup']:.2f}x, acceptance "
              f"{row['acceptance_rate']:.2f} of {drafted}, {row['output_tokens']} tokens, "
              f"equal {row['tokens_equal']}")
    results["grounded median speedup"] = statistics.median(
        results[task]["speedup"] for task in GROUNDED)
    print(f"input-grounded tasks, median speedup: {results['grounded median speedup']:.2f}x")
    return results


def _sim_prompts(text: list[int], batch: int, length: int, edit_every: int,
                 max_tokens: int) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts holding the stretch of text each seed's reply will copy, edited."""
    from pagedserve.worker.simulated import _spread

    prompts, params = [], []
    for seed in range(batch):
        start = _spread(seed, 0) % len(text)
        copy = [text[(start + i) % len(text)] for i in range(length)]
        # Each request's edits at a phase of its own: a batch's sequences are not all at
        # an edit (where lookup finds nothing) in the same step.
        for i in range((edit_every // 2 + seed) % edit_every, length, edit_every):
            copy[i] = text[(start + i + 7919) % len(text)]  # another word of the text
        prefix = [text[(start + 50_000 + i) % len(text)] for i in range(64)]  # the "instruction"
        prompts.append({"prompt_token_ids": prefix + copy})
        params.append(SamplingParams(temperature=0.0, seed=seed, max_tokens=max_tokens,
                                     ignore_eos=True))
    return prompts, params


def run_sim(batches: list[int], rounds: int, k: int, lookup: tuple[int, int], edit_every: int,
            max_tokens: int, draft_k: int, draft_acceptance: float) -> dict:
    config = load(SIM_CONFIG)

    def speculating(speculative: dict) -> object:
        data = config.model_dump()
        data["engine"]["speculative"] = speculative
        data["engine"]["simulator"]["draft_acceptance"] = draft_acceptance
        return config.model_validate(data)

    systems = {"plain": LLM(config=config),
               "ngram": LLM(config=speculating(_spec(k, lookup))),
               "draft 1B": LLM(config=speculating({"model": DRAFT,
                                                   "num_speculative_tokens": draft_k}))}
    # Three engines live in this one process: the collector would otherwise walk the
    # others' objects in each one's steps, and the engines built last ran 5-7% slower
    # than the first with identical configs. Their state is set up: freeze it.
    gc.collect()
    gc.freeze()
    text = systems["plain"].engine.executor.worker.text
    results = {}
    for batch in batches:
        prompts, params = _sim_prompts(text, batch, max_tokens + 16, edit_every, max_tokens)
        rates: dict[str, list[float]] = {name: [] for name in systems}
        stats: dict[str, dict] = {}
        for round_ in range(rounds):
            names = list(systems)
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                llm = systems[name]
                before = llm.get_spec_decode_stats()
                start = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
                print(f"  batch {batch} round {round_} {name}: {rates[name][-1]:.0f} tok/s",
                      flush=True)
                after = llm.get_spec_decode_stats()
                stats[name] = {key: after[key] - before[key]
                               for key in ("draft_tokens", "accepted_tokens", "decode_steps",
                                           "speculating_steps")}
        plain = statistics.median(rates["plain"])
        row: dict = {"plain_tokens_per_s": plain}
        line = f"batch {batch:4d}: plain {plain:7.0f} tok/s"
        for name in systems:
            if name == "plain":
                continue
            rate, seen = statistics.median(rates[name]), stats[name]
            drafted = seen["draft_tokens"]
            row[name] = {"tokens_per_s": rate, "ratio": rate / plain,
                         "acceptance_rate": seen["accepted_tokens"] / drafted if drafted else 0.0,
                         "speculating_share": seen["speculating_steps"]
                         / max(1, seen["decode_steps"])}
            line += (f" | {name} {rate:7.0f} tok/s {rate / plain:.2f}x, acceptance "
                     f"{row[name]['acceptance_rate']:.2f}, speculating "
                     f"{row[name]['speculating_share']:.2f}")
        results[str(batch)] = row
        print(line)
    gc.unfreeze()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="SmolLM2 on the CPU, one stream")
    parser.add_argument("--sim", action="store_true", help="the simulated H200 at --batches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    parser.add_argument("--lookup", type=int, nargs=2, default=[3, 5], metavar=("MIN", "MAX"),
                        help="prompt_lookup_min and prompt_lookup_max")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--draft-k", type=int, default=4,
                        help="--sim: the draft model's num_speculative_tokens")
    parser.add_argument("--draft-acceptance", type=float, default=0.7,
                        help="--sim: simulator.draft_acceptance (assumed, not measured)")
    parser.add_argument("--edit-every", type=int, default=12,
                        help="--sim: one prompt token in this many differs from the reply")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "speculative.json")
    args = parser.parse_args()
    both = not (args.cpu or args.sim)
    report: dict = {"machine": platform.processor() or platform.machine(),
                    "date": date.today().isoformat(), "k": args.k, "lookup": args.lookup,
                    "rounds": args.rounds}
    if args.cpu or both:
        report["cpu"] = run_cpu(args.rounds, args.k, tuple(args.lookup), args.max_tokens)
    if args.sim or both:
        report["sim"] = run_sim(args.batches, args.rounds, args.k, tuple(args.lookup),
                                args.edit_every, args.max_tokens, args.draft_k,
                                args.draft_acceptance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
