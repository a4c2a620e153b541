"""Paged attention kernels on a GPU: achieved bandwidth, cost of paging, prefill TFLOP/s.

Decode: one query token per sequence, Llama-3-8B attention shape (32 query
heads over 8 KV heads, head_dim 128), bf16, block_size 16, each sequence's
blocks scattered over the pool in random order. For every batch x context:

* kernel time, the median of `--iters` runs timed with CUDA events;
* achieved bandwidth = (K/V read + Q read + output written) / time, as a
  fraction of the device-to-device copy bandwidth measured in the same run
  (read + write bytes of a 1 GiB `copy_`);
* the no-paging reference: torch SDPA on the same K/V stored contiguously
  ([batch, kv_heads, context, head_dim]); paging cost = paged / SDPA - 1.

Prefill: `--prefill-batch` prompts of `--prefill-len` tokens (causal, empty
prefix), TFLOP/s of the paged kernel against SDPA's causal kernel on the same
contiguous data.

Every kernel's output is checked against SDPA before it is timed.

    python benchmarks/attention_kernels.py       # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --smoke   # CPU: exercises the
        script with tiny shapes in Triton's interpreter; its times mean nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.kernels.decode_attention import default_num_splits, paged_decode_attention
from pagedserve.kernels.prefill_attention import paged_prefill_attention
from pagedserve.math_utils import cdiv


def median_ms(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up: compiles on first use
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), iters, device) / 1e3)


def paged_context(batch: int, context: int, num_kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """A pool holding `batch` contexts in shuffled blocks, and the same K/V contiguous."""
    blocks_per_seq = cdiv(context, block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = order.view(batch, blocks_per_seq).to(torch.int32)

    def contiguous(cache):  # [batch, kv_heads, context, head_dim]
        rows = cache[block_tables.long()].flatten(1, 2)[:, :context]
        return rows.transpose(1, 2).contiguous()

    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return (key_cache, value_cache, block_tables, seq_lens, contiguous(key_cache),
            contiguous(value_cache))


def bench_decode(args, batch: int, context: int, device: torch.device, copy_bw: float) -> dict:
    gen = torch.Generator(device=device).manual_seed(batch * 100_003 + context)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    key_cache, value_cache, tables, seq_lens, k, v = paged_context(
        batch, context, hkv, d, args.block_size, dtype, device, gen)
    query = torch.randn(batch, h, d, generator=gen, device=device, dtype=dtype)
    out = torch.empty_like(query)
    scale = d ** -0.5
    num_splits = default_num_splits(device, batch, hkv, context)

    def paged():
        paged_decode_attention(query, key_cache, value_cache, tables, seq_lens, scale,
                               max_seq_len=context, num_splits=num_splits, out=out)

    def sdpa():
        return F.scaled_dot_product_attention(query[:, :, None], k, v, scale=scale, enable_gqa=True)

    paged()
    expected = sdpa()[:, :, 0]
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    t_paged = median_ms(paged, args.iters, device)
    t_sdpa = median_ms(sdpa, args.iters, device)
    element = query.element_size()
    nbytes = 2 * batch * context * hkv * d * element + 2 * batch * h * d * element
    return dict(batch=batch, context=context, num_splits=num_splits, paged_ms=t_paged,
                sdpa_ms=t_sdpa, bytes=nbytes, bandwidth=nbytes / (t_paged / 1e3),
                bandwidth_fraction=nbytes / (t_paged / 1e3) / copy_bw,
                paging_cost=t_paged / t_sdpa - 1)


def bench_prefill(args, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(7)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, n = args.prefill_batch, args.prefill_len
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    key_cache, value_cache, tables, seq_lens, k, v = paged_context(
        b, n, hkv, d, args.block_size, dtype, device, gen)
    q = torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype)
    query = q.transpose(1, 2).reshape(b * n, h, d).contiguous()  # [tokens, heads, head_dim]
    cu_seqlens = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = d ** -0.5

    def paged():
        paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens, cu_seqlens,
                                scale, max_query_len=n, out=out)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                              enable_gqa=True)

    paged()
    expected = sdpa().transpose(1, 2).reshape(b * n, h, d)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    t_paged = median_ms(paged, args.iters, device)
    t_sdpa = median_ms(sdpa, args.iters, device)
    flops = 4 * b * h * d * n * (n + 1) / 2  # QK^T and PV over the causal triangle
    return dict(batch=b, prompt_len=n, paged_ms=t_paged, sdpa_ms=t_sdpa,
                paged_tflops=flops / t_paged / 1e9, sdpa_tflops=flops / t_sdpa / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--copy-gib", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, a few iterations: checks the script, "
                             "not the kernels' speed")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/attention_kernels.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batches, args.contexts, args.iters = [1, 3], [40, 100], 2
        args.num_heads, args.num_kv_heads, args.head_dim = 8, 2, 64
        args.prefill_batch, args.prefill_len, args.copy_gib = 2, 48, 1 / 64
    elif device.type != "cuda":
        parser.error("no CUDA device: run on a GPU, or pass --smoke (with TRITON_INTERPRET=1)")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"
    copy_bw = copy_bandwidth(device, int(args.copy_gib * 2**30), args.iters)
    print(f"{name}: device-to-device copy {copy_bw / 1e9:.0f} GB/s")
    decode = []
    print("| batch | context | splits | paged us | SDPA us | GB/s | of copy BW | paging cost |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for context in args.contexts:
            r = bench_decode(args, batch, context, device, copy_bw)
            decode.append(r)
            print(f"| {batch} | {context} | {r['num_splits']} | {r['paged_ms'] * 1e3:.1f} | "
                  f"{r['sdpa_ms'] * 1e3:.1f} | {r['bandwidth'] / 1e9:.0f} | "
                  f"{r['bandwidth_fraction']:.0%} | {r['paging_cost']:+.1%} |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    prefill = bench_prefill(args, device)
    print(f"prefill {prefill['batch']} x {prefill['prompt_len']} tokens: paged "
          f"{prefill['paged_tflops']:.1f} TFLOP/s ({prefill['paged_ms']:.2f} ms), SDPA "
          f"{prefill['sdpa_tflops']:.1f} TFLOP/s ({prefill['sdpa_ms']:.2f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        device=name, date=datetime.date.today().isoformat(), torch=torch.__version__,
        smoke=args.smoke, copy_bandwidth=copy_bw, decode=decode, prefill=prefill), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
