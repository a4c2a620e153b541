"""GPU end to end: pagedserve against HF transformers on one GPU, same weights.

The model is Llama-3-8B-shaped (the bundled preset's config), bf16, with
random weights: pagedserve draws them on the GPU (`load_format="dummy"`), and
HF's LlamaForCausalLM of the same config gets a copy of them (q/k/v and
gate/up split back apart), so both run the same network and their greedy
tokens can be compared request by request.

Parts, all in one run by default (`--parts` picks), decode and graphs first
(seconds, pagedserve alone), then throughput (minutes, against HF); the report
is rewritten after each measurement, so a run stopped at a limit keeps what it
finished:

* throughput: output tokens/s for the four scenarios of benchmarks/throughput.py
  (prompt lengths / --scale, request counts x --requests-scale) and for fixed
  input/output pairs 512/256, 2048/256 and 2048/1024 (--pair-requests each).
  Against HF `generate` on static batches (batch size = KV budget // (longest
  prompt + longest output), as in throughput.py) and HF `generate_batch`
  (paged cache of the same budget). Every system gets --kv-tokens of KV.
* decode: the time of one decode step at batch 1, 64 and 256 (prompts of
  --decode-context tokens), next to the memory-bandwidth floor: bytes read per
  step (every weight but the embedding table, plus each sequence's whole KV
  context) / the device's measured copy bandwidth. Also the host's share:
  device time per step from CUDA events vs wall time per engine step.
* graphs: decode step time with CUDA graphs and eagerly, at batch 1 and 8.

    python benchmarks/gpu_e2e.py                     # the recorded run, on a GPU
    python benchmarks/gpu_e2e.py --tiny --device cpu # a small smoke run of every part
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import throughput
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from pagedserve import LLM, SamplingParams
from pagedserve.math_utils import cdiv
from pagedserve.planner import load_presets
from pagedserve.worker.layers.linear import dense_parameters
from pagedserve.worker.step_timer import StepTimer

PAIRS = [(512, 256), (2048, 256), (2048, 1024)]
BLOCK = 16
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=4096,
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def model_config_dir(tiny: bool) -> Path:
    """A directory holding only config.json: the 8B preset's, or a tiny one for smoke runs."""
    config = dict(TINY) if tiny else {k: v for k, v in load_presets()["llama-3-8b"].items()
                                      if not k.startswith("pagedserve_")}
    folder = Path(tempfile.mkdtemp(prefix="pagedserve-gpu-e2e-"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_copy(llm: LLM, model_dir: Path, dtype: torch.dtype, device: torch.device):
    """HF's LlamaForCausalLM with pagedserve's weights, fused projections split back apart."""
    ours = llm.engine.executor.worker.model
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    parts: dict[str, list[tuple[int, str]]] = {}
    for fused, part, shard in ours.stacked_params:
        parts.setdefault(fused, []).append((shard, part))
    state = {}
    for name, param in dense_parameters(ours).items():  # packed CPU weights read back
        module_name, _ = name.rsplit(".", 1)
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf not in parts:
            state[name] = param
            continue
        sizes = ours.get_submodule(module_name).part_sizes
        for (_, part), chunk in zip(sorted(parts[leaf]), param.split(sizes, dim=0), strict=True):
            state[name.replace(f".{leaf}.", f".{part}.")] = chunk
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in key for key in missing):
        raise RuntimeError(f"weights do not map onto HF's model: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.eval()


def run_pagedserve(llm: LLM, requests):
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_requests(rng: random.Random, vocab: int, count: int, prompt: int, output: int):
    return [([rng.randrange(10, vocab) for _ in range(prompt)], output) for _ in range(count)]


def agreed_prefixes(ours, theirs, requests) -> list[int]:
    """How many leading output tokens each request's two runs share: where greedy
    decoding parts (in bf16 with random weights, at a near-tie of the logits)."""
    agreed = []
    for a, b, (_, limit) in zip(ours, theirs, requests, strict=True):
        a, b = list(a[:limit]), list(b[:limit])
        pairs = enumerate(zip(a, b, strict=False))  # an early EOS ends one run sooner
        agreed.append(next((i for i, (x, y) in pairs if x != y), min(len(a), len(b))))
    return agreed


def median(values: list) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def compare(name, requests, llm, hf, args, max_len, rows):
    """One workload on the three systems; appends its row and prints it."""
    useful = sum(o for _, o in requests)
    reserve = max(len(p) for p, _ in requests) + max(o for _, o in requests)
    if reserve > max_len:
        raise SystemExit(f"{name}: a request may need {reserve} tokens, "
                         f"over max_model_len={max_len}")
    batch_size = max(1, args.kv_tokens // reserve)
    row = dict(workload=name, requests=len(requests), output_tokens=useful,
               prompt_tokens=sum(len(p) for p, _ in requests), static_batch_size=batch_size)
    seconds, ours = run_pagedserve(llm, requests)
    row.update(paged_s=seconds, paged_tok_s=useful / seconds)
    print(f"## {name}: {len(requests)} requests, {row['prompt_tokens']} prompt tokens, {useful} "
          f"output tokens\n  pagedserve      {seconds:8.2f} s {useful / seconds:9.1f} tok/s",
          flush=True)
    if not args.skip_hf:
        seconds, theirs = throughput.run_hf_static(hf, requests, batch_size, args.pad_id)
        row.update(static_s=seconds, static_tok_s=useful / seconds,
                   vs_static=row["paged_tok_s"] * seconds / useful,
                   match_static=throughput.matches(ours, theirs, requests),
                   agreed_static=agreed_prefixes(ours, theirs, requests))
        print(f"  HF generate     {seconds:8.2f} s {useful / seconds:9.1f} tok/s  "
              f"batch {batch_size}"
              f"  {row['vs_static']:.1f}x  greedy equal {row['match_static']}/{len(requests)}"
              f"  (leading tokens equal: median {median(row['agreed_static'])})", flush=True)
    if not args.skip_hf and not args.skip_hf_batch:
        seconds, theirs, _ = throughput.run_hf_batch(hf, requests, args.kv_tokens, args.pad_id,
                                                      max_batch_tokens=args.max_batched_tokens)
        row.update(batch_s=seconds, batch_tok_s=useful / seconds,
                   vs_batch=row["paged_tok_s"] * seconds / useful,
                   match_batch=throughput.matches(ours, theirs, requests))
        print(f"  HF gen_batch    {seconds:8.2f} s {useful / seconds:9.1f} tok/s"
              f"  {row['vs_batch']:.1f}x  greedy equal {row['match_batch']}/{len(requests)}",
              flush=True)
    rows.append(row)


def copy_bandwidth(device: torch.device, nbytes: int = 2**31) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of 5."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes(llm: LLM) -> int:
    """Bytes one decode step reads of the weights: all but the embedding table (it reads
    only the batch's rows), unless the LM head shares it."""
    model = llm.engine.executor.worker.model
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not embed or p is model.lm_head.weight)


def decode_steps(llm: LLM, batch: int, context: int, steps: int, rng: random.Random,
                 graphs: bool = True) -> dict:
    """Time `steps` decode steps of `batch` sequences whose prompts have `context` tokens."""
    engine = llm.engine
    runner = engine.executor.worker.runner
    saved_graphs = runner.graphs
    vocab = engine.info.vocab_size
    needed = batch * cdiv(context + steps + 4, BLOCK)
    if needed > engine.block_manager.num_blocks:
        raise SystemExit(f"decode batch {batch} x {context} tokens needs {needed} blocks, the pool "
                         f"has {engine.block_manager.num_blocks}: raise --kv-tokens")
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    ids = [f"decode-{batch}-{i}-{rng.random()}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(10, vocab) for _ in range(context)], params)
    started: set[str] = set()
    while len(started) < batch:  # prefill every prompt; after this every step is all decodes
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    runner.graphs = saved_graphs if graphs else None
    runner.timer = StepTimer(engine.info.device)
    wall = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            wall.append(time.perf_counter() - start)
        times = runner.timer.summary()
    finally:
        runner.timer, runner.graphs = None, saved_graphs
        for request_id in ids:
            engine.abort_request(request_id)
    skip = min(2, steps - 1)  # the first steps after the prefill settle the allocator
    step_s, device_s, prepare_s = (median(values[skip:])
                                   for values in (wall, times["device"], times["prepare"]))
    return dict(batch=batch, context=context, graphs=graphs and saved_graphs is not None,
                step_ms=step_s * 1e3, device_ms=device_s * 1e3, prepare_ms=prepare_s * 1e3,
                host_fraction=(step_s - device_s) / device_s)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["throughput", "decode", "graphs"],
                        default=["throughput", "decode", "graphs"])
    parser.add_argument("--scenarios", nargs="+", choices=list(throughput.SCENARIOS),
                        default=list(throughput.SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0, help="divide prompt lengths by this")
    parser.add_argument("--requests-scale", type=float, default=0.25,
                        help="multiply the scenarios' request counts (200/200/100/80) by this")
    parser.add_argument("--output-min", type=int, default=32)
    parser.add_argument("--output-max", type=int, default=192)
    parser.add_argument("--pair-requests", type=int, default=64)
    parser.add_argument("--kv-tokens", type=int, default=163840,
                        help="KV budget of every system, in tokens (8B bf16: 128 KiB a token, "
                             "so 20 GiB; batch 256 x 512 decodes fit)")
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--skip-hf", action="store_true", help="pagedserve only")
    parser.add_argument("--skip-hf-batch", action="store_true", help="skip HF generate_batch")
    parser.add_argument("--tiny", action="store_true",
                        help="a small model and workloads: a smoke run of every part")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gpu_e2e.json")
    args = parser.parse_args()
    if args.tiny:
        args.scale, args.requests_scale, args.output_min, args.output_max = 16.0, 0.03, 4, 12
        args.pair_requests, args.kv_tokens, args.max_batched_tokens = 3, 4096, 1024
        args.decode_context, args.decode_steps = 24, 4
    args.pairs = [(p // 32, o // 32) if args.tiny else (p, o) for p, o in PAIRS]
    args.decode_batches = [1, 4] if args.tiny else [1, 64, 256]
    args.copy_bytes = 2**27 if args.tiny else 2**31  # a tiny run's copy: past the CPU's caches
    args.graph_batches = [1, 8]
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    command = "python " + " ".join(["benchmarks/gpu_e2e.py", *sys.argv[1:]])
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine())
    machine = f"{gpu}, torch {torch.__version__}, {platform.platform()}"
    today = datetime.date.today().isoformat()
    print(f"# GPU end to end, {today}\n{command}\n{machine}", flush=True)

    model_dir = model_config_dir(args.tiny)
    max_len = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    start = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, device=args.device,
              dtype=str(dtype).removeprefix("torch."), block_size=BLOCK, max_model_len=max_len,
              num_gpu_blocks=args.kv_tokens // BLOCK, max_num_seqs=256,
              max_num_batched_tokens=args.max_batched_tokens, swap_space=0)
    startup_s = time.perf_counter() - start
    graphs = llm.engine.executor.worker.runner.graphs
    report = dict(command=command, machine=machine, date=today, args=vars(args),
                  startup_s=startup_s, parameters=sum(
                      p.numel() for p in llm.engine.executor.worker.model.parameters()))
    if graphs is not None:
        report.update(graph_sizes=graphs.sizes, graph_capture_s=graphs.capture_s,
                      graph_memory_bytes=graphs.memory_bytes)
    print(f"pagedserve up in {startup_s:.1f} s (dummy weights, {report['parameters'] / 1e6:,.0f}M "
          f"parameters, {dtype})" + (f"; CUDA graphs for {len(graphs.sizes)} sizes in "
                                     f"{graphs.capture_s:.1f} s, "
                                     f"{graphs.memory_bytes / 2**20:.0f} MiB"
                                     if graphs else "; no CUDA graphs"), flush=True)
    hf = None
    if "throughput" in args.parts and not args.skip_hf:
        hf = hf_copy(llm, model_dir, dtype, device)
        args.pad_id = 0
    rng = random.Random(args.seed)

    # Warm-up outside every timing: kernels compile and autotune here.
    warm = random_requests(rng, 1000, 2, 24, 8)
    run_pagedserve(llm, warm)
    if hf is not None:
        throughput.run_hf_static(hf, warm, 2, args.pad_id)
        if not args.skip_hf_batch:
            throughput.run_hf_batch(hf, warm, 1024, args.pad_id)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """The report so far: a run stopped at a time limit keeps the parts it finished."""
        out.write_text(json.dumps(report, indent=2, default=str))

    # The step timings first (pagedserve alone, seconds), then the comparison (minutes).
    if "decode" in args.parts:
        bandwidth = copy_bandwidth(device, args.copy_bytes)
        weights = weight_bytes(llm)
        info = llm.engine.executor.worker
        kv_per_token = info.block_bytes // BLOCK
        report["copy_bandwidth"] = bandwidth
        rows = report["decode"] = []
        print(f"\n## decode steps: copy bandwidth {bandwidth / 1e9:.0f} GB/s, weights read per "
              f"step {weights / 2**30:.2f} GiB, KV {kv_per_token} bytes a token", flush=True)
        for batch in args.decode_batches:
            row = decode_steps(llm, batch, args.decode_context, args.decode_steps, rng)
            kv = batch * (args.decode_context + args.decode_steps // 2) * kv_per_token
            row.update(floor_ms=(weights + kv) / bandwidth * 1e3)
            row["vs_floor"] = row["device_ms"] / row["floor_ms"]
            rows.append(row)
            print(f"  batch {batch:3d}: step {row['step_ms']:.2f} ms (device {row['device_ms']:.2f}"
                  f" ms, floor {row['floor_ms']:.2f} ms = {row['vs_floor']:.2f}x; host "
                  f"{row['host_fraction']:.0%} of device time)", flush=True)
            save()

    if "graphs" in args.parts:
        rows = report["graphs"] = []
        print("\n## CUDA graphs on vs off", flush=True)
        for batch in args.graph_batches:
            on = decode_steps(llm, batch, args.decode_context, args.decode_steps, rng, graphs=True)
            off = decode_steps(llm, batch, args.decode_context, args.decode_steps, rng,
                               graphs=False)
            if not on["graphs"]:
                print(f"  batch {batch:3d}: no CUDA graphs here (both runs eager): "
                      f"{on['step_ms']:.2f} and {off['step_ms']:.2f} ms", flush=True)
                continue
            rows.append(dict(batch=batch, graphs_ms=on["step_ms"], eager_ms=off["step_ms"],
                             speedup=off["step_ms"] / on["step_ms"]))
            print(f"  batch {batch:3d}: graphs {on['step_ms']:.2f} ms, "
                  f"eager {off['step_ms']:.2f} ms"
                  f" = {off['step_ms'] / on['step_ms']:.2f}x", flush=True)
        save()

    vocab = llm.engine.info.vocab_size
    if "throughput" in args.parts:
        rows = report["throughput"] = []
        for name in args.scenarios:
            requests = [([t % vocab for t in p], o) for p, o in throughput.workload(name, args)]
            compare(name, requests, llm, hf, args, max_len, rows)
            save()
        for prompt, output in args.pairs:
            requests = random_requests(rng, vocab, args.pair_requests, prompt, output)
            compare(f"{prompt}/{output}", requests, llm, hf, args, max_len, rows)
            save()
        del hf
        torch.cuda.empty_cache() if device.type == "cuda" else None

    stats = llm.get_memory_stats()
    report["blocks_in_use_at_end"] = stats["total_blocks"] - stats["free_blocks"]
    save()
    print(f"\nblocks in use at the end: {report['blocks_in_use_at_end']}\nwrote {out}")


if __name__ == "__main__":
    main()
