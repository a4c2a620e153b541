"""CPU kernels in a C++ extension: paged attention that reads K/V from the blocks in
place, a MoE layer's experts, the greedy argmax, rotary embeddings in place, and
RMSNorm fused with the residual add.

Attention: the torch path (reference.py) copies each sequence's K/V out of the pool
(`index_select`) in every layer, which is most of a decode token's attention
time. csrc/cpu_attention.cpp walks the block table instead: per
(sequence, KV head, tile of query rows) it reads each K and V row once, for
all the query heads that share it, with float32 scores and accumulation.

`argmax_rows` is torch.argmax over float32 rows, which on the CPU runs far
slower than a vectorized maximum such as `amax`. `rotary_` rotates q and k
where the QKV projection wrote them, with no temporaries. `rms_norm` adds a
sublayer's output into the residual stream and normalizes the sum in one
pass, where torch takes five ops and as many temporaries. `silu_and_mul` is
the MLP's SiLU(gate) * up in one call instead of three. These four are in
csrc/cpu_ops.cpp.

`fused_moe` (csrc/cpu_moe.cpp) runs a float32 MoE layer's experts on weights
that `pack_moe` lays out once at load: the pairs sorted by expert, SiLU(gate) *
up formed in registers, each expert's weights read once per tile of rows. At
decode sizes it takes about half the time of one oneDNN GEMM pair per expert
(see its header). csrc/cpu_bindings.cpp registers all five as one module.

The extension is compiled once per machine, with the machine's own vector
instructions (`-march=native`), by `torch.utils.cpp_extension` into torch's
extension cache (`$TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions),
which rebuilds it when the flags or torch change and locks the build so that
processes starting together build it once. The cache keeps one build per
extension name, so the name carries a hash of the sources' paths and contents:
an edited source, or another copy of pagedserve on the machine, gets a build
of its own instead of replacing (or loading) one built from other sources.
`python -m pagedserve.kernels.cpu_kernels` builds it; `make install` runs
that.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "cpu_attention.cpp", _CSRC / "cpu_moe.cpp", _CSRC / "cpu_quant_gemm.cpp",
            _CSRC / "cpu_ops.cpp", _CSRC / "cpu_bindings.cpp"]
_HEADERS = [_CSRC / "cpu_kernels.h"]
# -fopenmp: at::parallel_for is inlined, and runs on torch's OpenMP threads only when built so.
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


class CPUKernelsUnavailable(RuntimeError):
    """The extension cannot be built here (no compiler, or the build failed)."""


@functools.cache
def extension():
    """The compiled module, built on first use if `make install` has not built it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise CPUKernelsUnavailable(
            f"the CPU attention kernel needs a C++ compiler, and {compiler!r} is not on PATH: "
            "install one (Debian/Ubuntu: apt install g++), or set attention_backend='torch'")
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(name=_build_name(), sources=[str(path) for path in _SOURCES],
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except (RuntimeError, OSError, ImportError) as error:
        names = ", ".join(path.name for path in _SOURCES)
        raise CPUKernelsUnavailable(
            f"building the CPU kernels ({names}) failed: {error}; set "
            "attention_backend='torch' to run without them") from error


def _build_name() -> str:
    """The extension's name in torch's cache: one build per set of sources (see above)."""
    digest = hashlib.sha256()
    for path in _SOURCES + _HEADERS:
        digest.update(str(path.resolve()).encode())
        digest.update(path.read_bytes())
    return f"pagedserve_cpu_kernels_{digest.hexdigest()[:16]}"


@functools.cache
def usable() -> bool:
    """Whether the extension is built or can be (callers with a torch fallback ask this)."""
    try:
        extension()
    except CPUKernelsUnavailable:
        return False
    return True


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None,
                    sequences: torch.Tensor | None = None,
                    window: int | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """reference.paged_attention, reading the blocks in place: [T, H, D] in the query's dtype.

    block_tables, seq_lens and query_start_loc are int32 (as AttentionMetadata holds them).
    `sequences` (int32) lists the sequences to compute; the rows of the others are left
    as `out` has them. With a sliding `window`, a query sees the last `window` positions.
    Caches of an fp8 dtype (kernels/kv_quant.py) are read times `k_scale` and `v_scale`.
    """
    query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    if sequences is None:
        sequences = _ALL
    return extension().paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                       query_start_loc, sequences, scale, window or 0, k_scale,
                                       v_scale, out)


_ALL = torch.empty(0, dtype=torch.int32)


def pack_moe(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE layer's float32 experts in csrc/cpu_moe.cpp's layout: w13 [E, 2 I, H] (gate
    rows, then up rows) -> [E, I_pad / 16, H, 32], each block 16 gate features then the
    same 16 up features for every input index; w2 [E, H, I] -> [E, H_pad / 32, I_pad, 32].
    I is padded to a multiple of 16 and H to one of 32 with zeros, which add nothing."""
    experts, hidden, inter = w2.shape
    i_pad, h_pad = -(-inter // 16) * 16, -(-hidden // 32) * 32
    gate_up = torch.zeros(experts, 2, i_pad, hidden, dtype=w13.dtype)
    gate_up[:, :, :inter] = w13.view(experts, 2, inter, hidden)
    w13_packed = (gate_up.view(experts, 2, i_pad // 16, 16, hidden)
                  .permute(0, 2, 4, 1, 3).reshape(experts, i_pad // 16, hidden, 32))
    down = torch.zeros(experts, h_pad, i_pad, dtype=w2.dtype)
    down[:, :hidden, :inter] = w2
    w2_packed = down.view(experts, h_pad // 32, 32, i_pad).transpose(2, 3)
    return w13_packed.contiguous(), w2_packed.contiguous()


def unpack_moe(w13_packed: torch.Tensor, w2_packed: torch.Tensor, hidden: int, inter: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_moe's inverse: (w13 [E, 2 I, H], w2 [E, H, I])."""
    experts, blocks, _, _ = w13_packed.shape
    gate_up = (w13_packed.view(experts, blocks, hidden, 2, 16).permute(0, 3, 1, 4, 2)
               .reshape(experts, 2, blocks * 16, hidden)[:, :, :inter])
    down = w2_packed.transpose(2, 3).reshape(experts, -1, w2_packed.shape[2])
    return (gate_up.reshape(experts, 2 * inter, hidden).contiguous(),
            down[:, :hidden, :inter].contiguous())


def fused_moe(hidden: torch.Tensor, w13_packed: torch.Tensor, w2_packed: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, first_expert: int = 0
              ) -> torch.Tensor:
    """reference.moe on float32 experts packed by `pack_moe`: hidden [T, H], each token's
    top-k router weights (float32) and global expert ids -> [T, H]. Ids outside
    [first_expert, first_expert + E) are other ranks' experts and add nothing."""
    return extension().fused_moe(hidden.contiguous(), w13_packed, w2_packed,
                                 topk_weights.float().contiguous(),
                                 topk_ids.long().contiguous(), first_expert)


FORMATS = ("int4", "int8", "fp8_e4m3")


def pack_quantized(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                   fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A weight W[n, k] = q[n, k] * scales[n, k // G] + offsets[n, k // G] in
    csrc/cpu_quant_gemm.cpp's layout: (qweight, scales, offsets) by blocks of 32 output
    features. q: [N, K] integers (int4: 0..15, int8: -128..127) or float8_e4m3fn
    values (fp8_e4m3); scales and offsets: [N, K / G]. They are held as float16
    where that holds every one exactly (GGUF's float16 scales: fewer bytes to
    stream), else as float32. N is padded to a multiple of 32 with zero rows."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: the CPU kernel takes {', '.join(FORMATS)}")
    if fmt == "fp8_e4m3":
        q = q.view(torch.uint8)
    n, k = q.shape
    n_pad = -(-n // 32) * 32
    if n_pad != n:
        q = torch.cat([q, q.new_zeros(n_pad - n, k)])
    blocks = q.view(n_pad // 32, 32, k).transpose(1, 2)  # [N / 32, K, 32]
    if fmt == "int4":
        if q.min() < 0 or q.max() > 15:
            raise ValueError("4-bit values must lie in 0..15")
        nibbles = blocks.to(torch.uint8)
        qweight = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    else:
        qweight = blocks.to(torch.int8) if fmt == "int8" else blocks

    held = torch.float16 if all(values is None or _exact_in_half(values)
                                for values in (scales, offsets)) else torch.float32

    def by_block(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        values = values.to(held)
        if n_pad != n:
            values = torch.cat([values, values.new_zeros(n_pad - n, values.shape[1])])
        return values.view(n_pad // 32, 32, -1).transpose(1, 2).contiguous()

    return qweight.contiguous(), by_block(scales), by_block(offsets)


def _exact_in_half(values: torch.Tensor) -> bool:
    return bool(torch.equal(values.half().float(), values.float()))


def unpack_quantized(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                     fmt: str, out_features: int) -> torch.Tensor:
    """The float32 weight [N, K] that pack_quantized's output stands for."""
    blocks, k, _ = qweight.shape
    if fmt == "int4":
        q = torch.cat([qweight & 0xF, qweight >> 4], dim=-1).float()  # [N / 32, K, 32]
    elif fmt == "fp8_e4m3":
        q = qweight.view(torch.float8_e4m3fn).float()
    else:
        q = qweight.float()
    group = k // scales.shape[1]
    weight = q * scales.float().repeat_interleave(group, dim=1)
    if offsets is not None:
        weight = weight + offsets.float().repeat_interleave(group, dim=1)
    return weight.transpose(1, 2).reshape(blocks * 32, k)[:out_features].contiguous()


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None, fmt: str, out_features: int) -> torch.Tensor:
    """x [..., K] float32 @ W^T for W packed by `pack_quantized`: [..., out_features]."""
    if x.dim() == 2 and x.is_contiguous():  # the forward's own shape: no reshapes
        return extension().quant_linear(x, qweight, scales, offsets, fmt, out_features)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = extension().quant_linear(flat, qweight, scales, offsets, fmt, out_features)
    return out.view(*x.shape[:-1], out_features)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for a contiguous [S, V] float32 tensor: [S] int64."""
    return extension().argmax_rows(logits)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, H_kv, D] (float32, contiguous head_dim) in place by the
    rows `positions` of the cos and sin tables [max_position, D]."""
    extension().rotary_(q, k, cos, sin, positions)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of contiguous float32 rows [T, 2 I] holding gate, then up: [T, I]."""
    return extension().silu_and_mul(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over contiguous float32 rows [T, H]. With
    `residual`, x is added into it in place first and the sum is normalized."""
    return extension().rms_norm(x, weight, eps, residual)



def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """reference.write_kv_cache for caches of the rows' own dtype (not fp8): key, value
    [T, H_kv, D] (head_dim contiguous), slot_mapping [T] int64, negative slots skipped."""
    extension().write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


if __name__ == "__main__":
    try:
        extension()
    except CPUKernelsUnavailable as error:
        raise SystemExit(f"pagedserve: {error}") from None
    print(f"pagedserve: CPU kernels built: {extension().__file__}")
