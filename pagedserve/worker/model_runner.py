"""StepInput -> model inputs -> forward -> sampled tokens.

A step's sequences are flattened into one token batch (inputs.py). Sequences
with one new token (decodes) are placed first, so attention backends can send
them to a decode kernel as a block of rows. Only the rows whose sequence
samples this step go through the LM head.

Rows that predict prompt tokens of a request asking for prompt logprobs are
scored too (prompt_logprobs.py). A decode-only step replays a CUDA graph when
the worker captured them (`graphs`, see cuda_graph.py); every other step runs
eagerly. `timer`, when set, measures how much of each step the host spends
building it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from pagedserve.scheduler.step import ScheduledSequence, StepInput, StepOutput
from pagedserve.worker import prompt_logprobs, sampler, spec_verify, token_masks
from pagedserve.worker.cuda_graph import DecodeGraphs
from pagedserve.worker.inputs import flatten
from pagedserve.worker.layers.attention import AttentionBackend, AttentionMetadata, KVCache
from pagedserve.worker.step_timer import StepTimer
from pagedserve.worker.transfer import to_device
from pagedserve.worker.worker_lora import WorkerLoRA


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
        self.lora: WorkerLoRA | None = None  # the adapter slots, when the engine serves LoRA
        # An EAGLE head drafts from the last step's hidden states: when set, `kept` holds
        # the step's sequences in row order and their rows [T, hidden].
        self.keep_hidden = False
        self.kept: tuple[list[ScheduledSequence], torch.Tensor] | None = None

    @torch.inference_mode()
    def execute(self, step: StepInput, kv_caches: list[KVCache]) -> StepOutput | None:
        """Rank 0 returns the step's samples; other tensor-parallel ranks return None."""
        if not step.seqs:  # a step of block moves only
            return StepOutput(samples=[], device_s=0.0)
        if self.timer:
            self.timer.start()
        # Decodes first (stable); under LoRA, by adapter slot within each, so every
        # adapter's tokens are a few contiguous runs (layers/lora.py).
        seqs = sorted(step.seqs, key=_by_slot if self.lora is not None else _decodes_first)
        sampling = [seq for seq in seqs if seq.do_sample]
        scoring = any(seq.prompt_targets for seq in seqs)
        graphs = self.graphs  # read once: a caller may swap it while this step runs (async)
        if graphs is not None and not scoring and graphs.fits(seqs):
            size, logits_rows = graphs.load(seqs)
            self._launching()
            hidden = graphs.replay(size, len(seqs))  # [num_seqs, hidden], a row per sequence
        else:
            input_ids, positions, metadata, logits_rows = self.prepare(seqs)
            self._launching()
            hidden = self.model(input_ids, positions, kv_caches, metadata)  # [T, hidden]
        if self.keep_hidden:
            self.kept = (seqs, hidden)
        scored = []
        if scoring:
            row_starts = np.cumsum([0] + [seq.num_tokens for seq in seqs[:-1]]).tolist()
            scored = prompt_logprobs.score(self.model, hidden, seqs, row_starts)
        if not sampling:
            return self._finish(StepOutput(samples=[], prompt_logprobs=scored))
        logits = self.model.compute_logits(hidden[logits_rows])  # [S, vocab], on rank 0 only
        if logits is None:
            return self._finish(None)
        # The sampling waits for a mask the engine fills while the forward ran.
        bitmask = token_masks.resolved(step.token_bitmask)
        if any(seq.draft_token_ids for seq in sampling):  # speculated tokens to verify
            samples = spec_verify.sample_and_verify(logits, sampling, self.generator, bitmask)
        else:
            samples = sampler.sample(logits, sampling, self.generator, bitmask)
        return self._finish(StepOutput(samples=samples, prompt_logprobs=scored))

    def _launching(self) -> None:
        if self.timer:
            self.timer.launch()
        self._launched = time.perf_counter()
        if self.device.type == "cuda":
            self._launch_event = torch.cuda.Event(enable_timing=True)
            self._launch_event.record()

    def _finish(self, output: StepOutput | None) -> StepOutput | None:
        """The step's output with its device time: first launch to the last kernel
        (CUDA events), or the compute on the host's clock where the host is the device."""
        if self.timer:
            self.timer.stop()
        if output is None:
            return None
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()  # the sampled ids are on the host: only the record is left
            device_s = self._launch_event.elapsed_time(end) / 1e3
        else:
            device_s = time.perf_counter() - self._launched
        return dataclasses.replace(output, device_s=device_s)

    def prepare(self, seqs: list[ScheduledSequence]):
        arrays = flatten(seqs, self.block_size)
        if self.lora is not None:
            self.lora.set_tokens(arrays.lora_slots)

        def as_tensor(values: np.ndarray) -> torch.Tensor:
            return to_device(torch.from_numpy(values), self.device)

        block_tables = as_tensor(arrays.block_tables)  # [B, max_blocks], padded past each context
        seq_lens = arrays.seq_lens.tolist()
        query_lens = arrays.query_lens.tolist()
        num_decodes = next((i for i, q_len in enumerate(query_lens) if q_len > 1), len(seqs))
        metadata = AttentionMetadata(
            slot_mapping=as_tensor(arrays.slots),
            query_start_loc=as_tensor(arrays.query_start_loc),
            seq_lens=as_tensor(arrays.seq_lens),
            block_tables=block_tables,
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            backend=self.attention,
            plan=self.attention.plan(block_tables, seq_lens, query_lens, num_decodes,
                                     self.block_size),
        )
        return (as_tensor(arrays.token_ids), as_tensor(arrays.positions), metadata,
                as_tensor(arrays.logits_rows))


def _decodes_first(seq: ScheduledSequence) -> bool:
    return seq.num_tokens > 1


def _by_slot(seq: ScheduledSequence) -> tuple[bool, bool, int]:
    """Decodes first; within each, base-model sequences first, then by adapter slot."""
    return seq.num_tokens > 1, seq.lora_slot is not None, seq.lora_slot or 0
