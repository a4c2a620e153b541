"""StepInput -> model inputs -> forward -> sampled tokens.

A step's sequences are flattened into one token batch:

    seq 0: prompt chunk of 5 tokens at positions 0..4   rows 0..4
    seq 1: decode token at position 36                   row  5
    seq 2: decode token at position 8                    row  6

and every token's K/V goes to slot `block_table[pos // block_size] *
block_size + pos % block_size`. Sequences with one new token (decodes) are
placed first, so attention backends can send them to a decode kernel as a
block of rows. Only the rows whose sequence samples this step go through the
LM head.

A decode-only step replays a CUDA graph when the worker captured them
(`graphs`, see cuda_graph.py); every other step runs eagerly. `timer`, when
set, measures how much of each step the host spends building it.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.scheduler.step import ScheduledSequence, StepInput, StepOutput
from pagedserve.worker import sampler
from pagedserve.worker.cuda_graph import DecodeGraphs
from pagedserve.worker.layers.attention import AttentionBackend, AttentionMetadata
from pagedserve.worker.step_timer import StepTimer
from pagedserve.worker.transfer import as_device_tensor

KVCache = tuple[torch.Tensor, torch.Tensor]


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, attention: AttentionBackend,
                 device: torch.device, seed: int) -> None:
        self.model = model
        self.block_size = block_size
        self.attention = attention
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.graphs: DecodeGraphs | None = None
        self.timer: StepTimer | None = None

    @torch.inference_mode()
    def execute(self, step: StepInput, kv_caches: list[KVCache]) -> StepOutput | None:
        """Rank 0 returns the step's samples; other tensor-parallel ranks return None."""
        if not step.seqs:  # a step of block moves only
            return StepOutput(samples=[])
        if self.timer:
            self.timer.start()
        seqs = sorted(step.seqs, key=lambda seq: seq.num_tokens > 1)  # decodes first, stable
        sampling = [seq for seq in seqs if seq.do_sample]
        if self.graphs is not None and self.graphs.fits(seqs):
            size = self.graphs.load(seqs)
            logits_rows = as_device_tensor(
                [row for row, seq in enumerate(seqs) if seq.do_sample], torch.int64, self.device)
            self._launching()
            hidden = self.graphs.replay(size, len(seqs))  # [num_seqs, hidden], a row per sequence
        else:
            input_ids, positions, metadata, logits_rows = self.prepare(seqs)
            self._launching()
            hidden = self.model(input_ids, positions, kv_caches, metadata)  # [T, hidden]
        if not sampling:
            return self._finish(StepOutput(samples=[]))
        logits = self.model.compute_logits(hidden[logits_rows])  # [S, vocab], on rank 0 only
        if logits is None:
            return self._finish(None)
        return self._finish(StepOutput(samples=sampler.sample(logits, sampling, self.generator)))

    def _launching(self) -> None:
        if self.timer:
            self.timer.launch()

    def _finish(self, output: StepOutput | None) -> StepOutput | None:
        if self.timer:
            self.timer.stop()
        return output

    def prepare(self, seqs: list[ScheduledSequence]):
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        logits_rows: list[int] = []
        for seq in seqs:
            table = seq.block_table
            token_ids.extend(seq.token_ids)
            span = range(seq.start_pos, seq.context_len)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            query_start_loc.append(query_start_loc[-1] + seq.num_tokens)
            if seq.do_sample:
                logits_rows.append(query_start_loc[-1] - 1)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs]

        def as_tensor(values, dtype):
            return as_device_tensor(values, dtype, self.device)

        block_tables = as_tensor(tables, torch.int32)  # [B, max_blocks], padded past each context
        seq_lens = [seq.context_len for seq in seqs]
        query_lens = [seq.num_tokens for seq in seqs]
        num_decodes = next((i for i, q_len in enumerate(query_lens) if q_len > 1), len(seqs))
        metadata = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            query_start_loc=as_tensor(query_start_loc, torch.int32),
            seq_lens=as_tensor(seq_lens, torch.int32),
            block_tables=block_tables,
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            backend=self.attention,
            plan=self.attention.plan(block_tables, seq_lens, query_lens, num_decodes, bs),
        )
        return (as_tensor(token_ids, torch.int64), as_tensor(positions, torch.int64), metadata,
                as_tensor(logits_rows, torch.int64))
