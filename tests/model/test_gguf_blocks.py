"""GGUF's quantized blocks read as stored (model/gguf_blocks.py): for every type the
CPU kernel runs, random blocks decode into integers, scales and offsets whose
weights are exactly what the `gguf` package's own dequantization gives."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagedserve.model.gguf_blocks import TYPES, decode
from pagedserve.model.quantized_rows import QuantizedRows

# Where each block keeps its float16 scale (and min): set to small finite values, as
# random bytes there could be infinities.
FLOAT16_AT = {"Q4_0": slice(0, 2), "Q8_0": slice(0, 2), "Q4_1": slice(0, 4),
              "Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_blocks_decode_to_the_weights_gguf_dequantizes(kind):
    bits, size, nbytes = TYPES[kind]
    rng = np.random.default_rng(len(kind) + nbytes)
    rows, blocks = 3, 4
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    at = FLOAT16_AT[kind]
    count = (at.stop - at.start) // 2
    raw[..., at] = (rng.uniform(-0.05, 0.05, (rows, blocks, count)).astype(np.float16)
                    .view(np.uint8))
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType[kind])
    q, scales, offsets, group = decode(kind, raw)
    assert q.shape == (rows, blocks * size) and scales.shape == (rows, blocks * size // group)
    limit = 2 ** bits if kind != "Q5_K" else 32  # Q5_K's 5 bits are held in 8
    assert q.min() >= (-limit // 2 if q.dtype == np.int8 else 0)
    assert q.max() < (limit // 2 if q.dtype == np.int8 else limit)
    weights = QuantizedRows(torch.from_numpy(q), torch.from_numpy(scales),
                            None if offsets is None else torch.from_numpy(offsets),
                            bits, group).dequantize()
    assert np.array_equal(weights.numpy(), expected.reshape(rows, -1))
