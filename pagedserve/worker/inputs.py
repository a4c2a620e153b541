"""A step's sequences flattened into the model's input arrays, on the host.

    seq 0: prompt chunk of 5 tokens at positions 0..4   rows 0..4
    seq 1: decode token at position 36                   row  5
    seq 2: decode token at position 8                    row  6

Every token's K/V goes to slot `block_table[pos // block_size] * block_size +
pos % block_size`. The per-sequence Python is one pass per field, gathering
values into numpy; positions and slots are then computed for all tokens at
once, so a step of 256 decodes costs a fraction of a millisecond here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from pagedserve.kernels.lora import NO_ADAPTER
from pagedserve.scheduler.step import ScheduledSequence


@dataclass
class StepArrays:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    query_lens: np.ndarray  # [B] int64
    seq_lens: np.ndarray  # [B] int32, context length after this step
    block_tables: np.ndarray  # [B, max blocks] int32, padded with block 0
    # [S] int64, the last row of each sequence that samples; a speculating one's last
    # 1 + k rows (its newest token's and its k draft tokens').
    logits_rows: np.ndarray
    # [T] int32, each token's adapter slot, NO_ADAPTER for a base token (the kernels'
    # encoding); None: no token of the step has an adapter.
    lora_slots: np.ndarray | None = None


def flatten(seqs: list[ScheduledSequence], block_size: int) -> StepArrays:
    count = len(seqs)
    query_lens = np.fromiter((len(seq.token_ids) for seq in seqs), np.int64, count)
    starts = np.fromiter((seq.start_pos for seq in seqs), np.int64, count)
    table_lens = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, count)
    tables = np.zeros((count, int(table_lens.max())), np.int32)
    tables[np.arange(tables.shape[1]) < table_lens[:, None]] = np.fromiter(
        chain.from_iterable(seq.block_table for seq in seqs), np.int32, int(table_lens.sum()))
    num_tokens = int(query_lens.sum())
    token_ids = np.fromiter(chain.from_iterable(seq.token_ids for seq in seqs), np.int64,
                            num_tokens)
    query_start_loc = np.zeros(count + 1, np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    owner = np.repeat(np.arange(count), query_lens)  # each token's sequence
    positions = starts[owner] + np.arange(num_tokens) - query_start_loc[owner]
    slots = tables[owner, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    do_sample = np.fromiter((seq.do_sample for seq in seqs), np.bool_, count)
    # The one place a sequence's `lora_slot` None becomes the kernels' NO_ADAPTER index.
    lora = np.fromiter((NO_ADAPTER if seq.lora_slot is None else seq.lora_slot for seq in seqs),
                       np.int32, count)
    return StepArrays(
        token_ids=token_ids, positions=positions, slots=slots,
        query_start_loc=query_start_loc.astype(np.int32), query_lens=query_lens,
        seq_lens=(starts + query_lens).astype(np.int32), block_tables=tables,
        logits_rows=_logits_rows(seqs, query_start_loc[1:][do_sample], do_sample),
        lora_slots=(np.repeat(lora, query_lens)
                    if any(seq.lora_slot is not None for seq in seqs) else None))


def _logits_rows(seqs: list[ScheduledSequence], ends: np.ndarray,
                 do_sample: np.ndarray) -> np.ndarray:
    """The rows the LM head reads: each sampling sequence's last, or last 1 + k."""
    rows = ends - 1
    drafted = [len(seq.draft_token_ids or ()) for seq, sample in zip(seqs, do_sample,
                                                                     strict=True) if sample]
    if not any(drafted):
        return rows
    return np.concatenate([np.arange(end - 1 - k, end) for end, k in zip(ends, drafted,
                                                                          strict=True)])
