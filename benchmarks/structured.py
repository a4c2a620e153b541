"""Structured outputs: what a grammar costs, and what it buys.

Three parts, each run with its flag (all three by default):

--compile   Compile time of three JSON schemas of increasing size against the
            embedded SmolLM2's 49,152-token vocabulary, and time to first token
            on the embedded default (CPU, one request, max_tokens 1) with a schema
            the engine has never seen against the same schema cached.
--mask      Output tokens/s on the simulated H200 (configs/llama-3-8b-h200-sim.yaml:
            Llama-3-8B's step times, the SmolLM2 tokenizer), every request
            constrained by a JSON schema against unconstrained, at each of
            --batches, alternating over --rounds (medians), and the host time per
            step. The simulated device samples the text's token where the mask
            allows it, else an allowed one, so the grammar does its real work.
--validity  The embedded default on the CPU: --requests requests over five JSON
            schemas, constrained and not, and the share whose text parses and
            validates (jsonschema). Then --requests chat requests with five tools,
            with tool_choice "required" (the grammar the server compiles for it,
            read as the server reads it; parallel_tool_calls false and true) and
            without a constraint (the tools and the hermes format in the prompt,
            read by the hermes parser, as "auto" is): the share that calls a
            tool whose arguments validate.

    python benchmarks/structured.py [--compile] [--mask] [--validity] [--rounds 3]
        [--batches 1 32 256] [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import jsonschema

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.config import load
from pagedserve.model import embedded

ROOT = Path(__file__).resolve().parent.parent
SIM_CONFIG = ROOT / "configs" / "llama-3-8b-h200-sim.yaml"

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "size": {"enum": ["S", "M", "L", "XL"]}},
     "required": ["ok", "size"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
     "minItems": 3, "maxItems": 5},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                      "temperature_c": {"type": "number"},
                                      "sunny": {"type": "boolean"}},
     "required": ["city", "temperature_c", "sunny"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 3,
                                               "items": {"type": "string", "maxLength": 12}},
                                      "priority": {"enum": ["low", "medium", "high"]}},
     "required": ["tags", "priority"], "additionalProperties": False},
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 60},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "minimum": 0},
            "from": {"enum": ["USD", "EUR", "GBP", "JPY"]},
            "to": {"enum": ["USD", "EUR", "GBP", "JPY"]}},
            "required": ["amount", "from", "to"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_event", "description": "Add an event to the calendar",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 40},
            "day": {"type": "integer", "minimum": 1, "maximum": 31},
            "all_day": {"type": "boolean"}},
            "required": ["title", "day"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string", "maxLength": 40},
            "subject": {"type": "string", "maxLength": 40}},
            "required": ["to", "subject"], "additionalProperties": False}}},
]
TOOL_PROMPTS = ["What is the weather in Lisbon right now?", "Find recent news about tides.",
                "How much is 120 euros in yen?", "Put the dentist on my calendar on the 14th.",
                "Email Sam that the meeting moved."]
HERMES_SYSTEM = ("You are a function-calling assistant. You may call these functions: {tools}. "
                 "To call one, reply with <tool_call>{{\"name\": <function name>, "
                 "\"arguments\": <arguments object>}}</tool_call>.")
PROMPTS = ["Give a person as JSON.", "Describe a shirt in JSON.", "List a few digits as JSON.",
           "Report the weather as JSON.", "Tag this ticket as JSON."]


def _sized_schema(properties: int) -> dict:
    """An object of `properties` typed fields, some nested: a schema grows with it."""
    props = {}
    for i in range(properties):
        kind = i % 4
        props[f"field_{i}"] = ({"type": "string", "maxLength": 16} if kind == 0 else
                               {"type": "integer", "minimum": 0} if kind == 1 else
                               {"enum": [f"v{j}" for j in range(8)]} if kind == 2 else
                               {"type": "object", "properties": {"x": {"type": "number"},
                                                                 "y": {"type": "boolean"}},
                                "required": ["x", "y"]})
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def run_compile(rounds: int) -> dict:
    from pagedserve.engine.grammar import GrammarCompiler

    path = embedded.fetch(embedded.DEFAULT)
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=1024, num_gpu_blocks=256)
    tokenizer = llm.get_tokenizer()
    results: dict = {"compile_s": {}, "ttft_s": {}}
    GrammarCompiler(tokenizer, llm.engine.info.vocab_size).compile(  # warm-up
        StructuredOutputsParams(json=_sized_schema(2)))
    for size in (4, 32, 256):
        times = []
        for round_ in range(rounds):
            compiler = GrammarCompiler(tokenizer, llm.engine.info.vocab_size)
            schema = {**_sized_schema(size), "title": f"round {round_}"}
            start = time.perf_counter()
            compiler.compile(StructuredOutputsParams(json=schema))
            times.append(time.perf_counter() - start)
            compiler.shutdown()
        results["compile_s"][f"{size} properties ({len(json.dumps(_sized_schema(size)))} "
                             f"bytes)"] = statistics.median(times)
        print(f"compile, {size} properties: {statistics.median(times) * 1e3:.1f} ms")
    prompt = llm.get_tokenizer().encode(PROMPTS[0])
    llm.generate([{"prompt_token_ids": prompt}],  # the engine's compiler made (once)
                 SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(
                     json=_sized_schema(2))), use_tqdm=False)
    new, cached = [], []
    for round_ in range(rounds):
        schema = {**_sized_schema(32), "title": f"ttft {round_}"}
        for bucket in (new, cached):  # first never seen, then the same again
            params = SamplingParams(temperature=0.0, max_tokens=1,
                                    structured_outputs=StructuredOutputsParams(json=schema))
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            bucket.append(time.perf_counter() - start)
    results["ttft_s"] = {"new schema": statistics.median(new),
                         "cached schema": statistics.median(cached)}
    print(f"time to first token, 32-property schema: new {statistics.median(new) * 1e3:.1f} ms, "
          f"cached {statistics.median(cached) * 1e3:.1f} ms")
    return results


def run_mask(batches: list[int], rounds: int, max_tokens: int) -> dict:
    config = load(SIM_CONFIG)
    llm = LLM(config=config)
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode("Write the record as JSON.")
    # Long enough that no request completes it within max_tokens: every request runs
    # max_tokens steps, constrained or not.
    length = max_tokens
    structured = StructuredOutputsParams(json={
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": length, "maxItems": length})
    llm.generate([{"prompt_token_ids": prompt}],  # compiled and cached before timing
                 SamplingParams(max_tokens=2, structured_outputs=structured), use_tqdm=False)
    rates: dict[tuple[int, str], list[float]] = {}
    host: dict[tuple[int, str], list[float]] = {}
    for round_ in range(rounds):
        for batch in batches:
            order = ["unconstrained", "json schema"]
            if round_ % 2:
                order.reverse()
            for system in order:
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                        structured_outputs=structured
                                        if system == "json schema" else None)
                before = llm.get_step_stats()
                start = time.perf_counter()
                outputs = llm.generate([{"prompt_token_ids": prompt + [10 + i]}
                                        for i in range(batch)], params, use_tqdm=False)
                seconds = time.perf_counter() - start
                after = llm.get_step_stats()
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                steps = after["steps"] - before["steps"]
                rates.setdefault((batch, system), []).append(tokens / seconds)
                host.setdefault((batch, system), []).append(
                    (after["host_s"] - before["host_s"]) / max(steps, 1))
                print(f"  [{round_ + 1}/{rounds}] batch {batch:3d} {system:13s} "
                      f"{tokens / seconds:9.0f} tok/s ({tokens} tokens, {steps} steps)")
    table = []
    for batch in batches:
        free = statistics.median(rates[(batch, "unconstrained")])
        bound = statistics.median(rates[(batch, "json schema")])
        table.append({"batch": batch, "unconstrained_tok_s": free, "constrained_tok_s": bound,
                      "ratio": bound / free,
                      "host_ms_per_step_unconstrained":
                          statistics.median(host[(batch, "unconstrained")]) * 1e3,
                      "host_ms_per_step_constrained":
                          statistics.median(host[(batch, "json schema")]) * 1e3})
    print("| batch | unconstrained tok/s | JSON schema tok/s | ratio | host ms a step "
          "(unconstrained / constrained) |")
    print("|---|---|---|---|---|")
    for row in table:
        print(f"| {row['batch']} | {row['unconstrained_tok_s']:.0f} | "
              f"{row['constrained_tok_s']:.0f} | {row['ratio']:.2f} | "
              f"{row['host_ms_per_step_unconstrained']:.2f} / "
              f"{row['host_ms_per_step_constrained']:.2f} |")
    return {"rows": table}


def run_validity(requests: int, max_tokens: int) -> dict:
    path = embedded.fetch(embedded.DEFAULT)
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=1024, num_gpu_blocks=1200,
              max_num_seqs=64)
    tokenizer = llm.get_tokenizer()
    results = {}
    for system in ("unconstrained", "json schema"):
        prompts, params = [], []
        for i in range(requests):
            schema = SCHEMAS[i % len(SCHEMAS)]
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} Follow this JSON "
                                             f"schema: {json.dumps(schema)}"}],
                tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
            params.append(SamplingParams(
                temperature=0.7, seed=i, max_tokens=max_tokens,
                structured_outputs=StructuredOutputsParams(json=schema)
                if system == "json schema" else None))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        valid = 0
        for i, output in enumerate(outputs):
            try:
                jsonschema.validate(json.loads(output.outputs[0].text), SCHEMAS[i % len(SCHEMAS)])
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        results[system] = valid / requests
        print(f"{system}: {valid}/{requests} parse and validate")
    results["tools"] = run_tool_validity(llm, requests, max_tokens)
    return results


def run_tool_validity(llm: LLM, requests: int, max_tokens: int) -> dict:
    """tool_choice "required" against the same chats unconstrained (read as "auto" with the
    hermes parser): the share of replies that call a tool with arguments that validate,
    with parallel_tool_calls false (one call) and true (a list the model may run on)."""
    from pagedserve.cluster.tool_parsers import HermesParser, RequiredParser
    from pagedserve.cluster.tools import Tool, ToolCalling, forced_schema

    tools = [Tool.model_validate(tool) for tool in TOOLS]
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    tokenizer = llm.get_tokenizer()
    system_prompt = HERMES_SYSTEM.format(tools=json.dumps([t["function"] for t in TOOLS]))
    systems = [("unconstrained (auto, hermes)", None, ToolCalling(HermesParser()))]
    for parallel in (False, True):
        schema = forced_schema(tools, "required", parallel=parallel)
        systems.append((f"tool_choice required, parallel_tool_calls {str(parallel).lower()}",
                        StructuredOutputsParams(json=schema), ToolCalling(RequiredParser())))
    results = {}
    for system, constraint, calling in systems:
        prompts, params = [], []
        for i in range(requests):
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": TOOL_PROMPTS[i % len(TOOL_PROMPTS)]}]
            ids = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
            prompts.append({"prompt_token_ids": list(ids)})
            params.append(SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens,
                                         structured_outputs=constraint))
        valid, cut_off = 0, 0
        for output in llm.generate(prompts, params, use_tqdm=False):
            choice = output.outputs[0]
            message, _ = calling.message(choice.text, choice.finish_reason)
            calls = message.get("tool_calls") or []
            try:
                for call in calls:
                    jsonschema.validate(json.loads(call["function"]["arguments"]),
                                        parameters[call["function"]["name"]])
            except (KeyError, ValueError, jsonschema.ValidationError):
                continue
            valid += bool(calls)
            cut_off += not calls and choice.finish_reason == "length"
        results[system] = {"valid": valid / requests, "cut_off_by_max_tokens": cut_off}
        print(f"tools, {system}: {valid}/{requests} call a tool with valid arguments "
              f"({cut_off} of the rest cut off by max_tokens)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--mask", action="store_true")
    parser.add_argument("--validity", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--mask-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--validity-tokens", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    everything = not (args.compile or args.mask or args.validity)
    report: dict = {"machine": platform.processor() or platform.machine(),
                    "date": date.today().isoformat(), "args": vars(args)}
    if args.compile or everything:
        report["compile"] = run_compile(args.rounds)
    if args.mask or everything:
        report["mask"] = run_mask(args.batches, args.rounds, args.mask_tokens)
    if args.validity or everything:
        report["validity"] = run_validity(args.requests, args.validity_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
