"""The KV cache's dtype (engine.kv_cache_dtype), and fp8 quantization of what it stores.

"auto" caches K and V in the model dtype. The fp8 dtypes store one byte a value,
as vLLM's `kv_cache_dtype` does, with one scale per layer for K and one for V
(the checkpoint's, else 1.0: worker/layers/kv_scales.py):

    stored = fp8(clamp(x / scale, -max, max))      max: 448 (e4m3), 57344 (e5m2)
    read   = float(stored) * scale

Values past the format's range saturate at its largest finite value: torch's
float32 -> float8_e5m2 cast gives inf there, and an inf key turns a whole row
of scores into NaN. Plain torch, no Triton: the CPU path and the reference
backend use these functions, the Triton kernels the same formulas bit for bit
(fp8_codec.py).

torch 2.13 on the CPU casts to and from both fp8 dtypes, and gathers, copies,
concatenates and fills fp8 tensors, but has no `index_copy_`, arithmetic,
`clamp` or `masked_fill` for them: scatters go through `.view(torch.uint8)`
(the same bytes), and arithmetic is done before quantizing or after reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """One fp8 dtype as the kernels see it."""

    name: str  # "e4m3" or "e5m2": what the Triton kernels are told (fp8_codec.py)
    max: float  # the largest finite value: what larger ones saturate to


FP8_FORMATS = {
    torch.float8_e4m3fn: FP8Format("e4m3", max=448.0),
    torch.float8_e5m2: FP8Format("e5m2", max=57344.0),
}
# engine.kv_cache_dtype's values other than "auto"; "fp8" is e4m3, as in vLLM.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for engine.kv_cache_dtype=`name`."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"engine.kv_cache_dtype={name!r}: expected 'auto' or one of "
                         f"{', '.join(repr(n) for n in KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


def fp8_format(dtype: torch.dtype) -> FP8Format | None:
    """The fp8 format of a cache dtype; None for a float cache (read as it is)."""
    return FP8_FORMATS.get(dtype)


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) / scale, saturated, as `dtype` (an fp8 dtype)."""
    limit = FP8_FORMATS[dtype].max
    if scale != 1.0:
        x = x.float() / scale
    return x.clamp(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Stored fp8 values as `dtype`, times the scale."""
    x = x.to(dtype)
    return x if scale == 1.0 else x * scale
