"""GGUF's quantized blocks read as they are stored: integers, and a float32 scale and
offset per group, W = q * scale + offset (model/quantized_rows.py). Each block
type, as ggml-common.h lays it out and ggml-quants.c's dequantize_row_* reads it:

    type  elements bytes  stored                                    as q, group, offset
    Q4_0  32       18     f16 d; 16 B of nibbles                    4-bit, 32, -8 d
    Q4_1  32       20     f16 d, f16 m; 16 B of nibbles             4-bit, 32, m
    Q8_0  32       34     f16 d; 32 int8                            8-bit, 32, none
    Q4_K  256      144    f16 d, f16 dmin; 12 B of 6-bit scales     4-bit, 32, -dmin m
                          and mins; 128 B of nibbles
    Q5_K  256      176    as Q4_K, and 32 B of fifth bits           5 bits in 8, 32, -dmin m
    Q6_K  256      210    128 B low nibbles, 64 B high 2 bits,      6 bits in 8 (signed), 16,
                          16 int8 scales; f16 d                     none

In a 32-element block byte j holds element j (low nibble) and j + 16 (high). In a
K block the nibbles come in chunks of 32 bytes: the low nibbles are one sub-block
of 32, the high nibbles the next. The scale of a sub-block is d times its 6-bit
(Q4_K, Q5_K) or 8-bit (Q6_K) scale, computed once as ggml computes it, so the
weights are the file's exactly.
"""

from __future__ import annotations

import numpy as np

# type -> (bits as held, elements per block, bytes per block)
TYPES = {"Q4_0": (4, 32, 18), "Q4_1": (4, 32, 20), "Q8_0": (8, 32, 34),
         "Q4_K": (4, 256, 144), "Q5_K": (8, 256, 176), "Q6_K": (8, 256, 210)}


def decode(kind: str, blocks: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """blocks [rows, n, bytes] of one type -> (q [rows, n * elements], scales and offsets
    [rows, groups] float32 (offsets None for none), group size)."""
    rows = blocks.shape[0]
    d = _halves(blocks[..., 0:2] if kind != "Q6_K" else blocks[..., 208:210])
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        if kind == "Q8_0":
            q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
            return q.reshape(rows, -1), d, None, 32
        nibbles = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
        q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(rows, -1)
        return q, d, _halves(blocks[..., 2:4]) if kind == "Q4_1" else -8 * d, 32
    if kind == "Q6_K":
        return _q6_k(blocks, d)
    dmin = _halves(blocks[..., 2:4])
    scale, low_min = _scales_and_mins(blocks[..., 4:16])  # [rows, n, 8] each
    qs = blocks[..., 16:144] if kind == "Q4_K" else blocks[..., 48:176]
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)  # sub-blocks 2c (low) and 2c + 1 (high)
    q = np.stack([chunks & 0xF, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], 256)
    if kind == "Q5_K":
        qh = blocks[..., 16:48]  # bit s of byte l: element l of sub-block s's fifth bit
        bits = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        q = q + (bits.reshape(*qh.shape[:-1], 256) << 4)
    scales = (d[..., None] * scale).reshape(rows, -1)
    offsets = -(dmin[..., None] * low_min).reshape(rows, -1)
    return q.reshape(rows, -1), scales, offsets, 32


def _q6_k(blocks: np.ndarray, d: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Two halves of 128 elements: 64 bytes of low nibbles (elements l and l + 32 in the
    low nibbles of bytes l and l + 32, l + 64 and l + 96 in their high ones), 32 bytes
    of high bit pairs (element l + 32 i in bits 2i, 2i + 1 of byte l); minus 32."""
    rows, n = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, n, 2, 2, 32)  # half, first or second 32 bytes
    qh = blocks[..., 128:192].reshape(rows, n, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=-2)  # [rows, n, half, 4, 32]: l, +32, +64, +96
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    return q, (d[..., None] * sc).reshape(rows, -1), None, 16


def _scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a K block's 12 bytes (ggml's get_scale_min_k4)."""
    q = packed.astype(np.uint8)
    scale = np.empty((*q.shape[:-1], 8), dtype=np.float32)
    low_min = np.empty_like(scale)
    scale[..., :4] = q[..., 0:4] & 63
    low_min[..., :4] = q[..., 4:8] & 63
    scale[..., 4:] = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    low_min[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return scale, low_min


def _halves(pairs: np.ndarray) -> np.ndarray:
    """[..., 2] bytes holding float16 values -> those values as float32 [...]."""
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)
