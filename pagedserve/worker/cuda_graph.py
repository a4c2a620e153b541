"""Decode steps replayed from CUDA graphs.

A decode step launches a few kernels per layer; at small batch sizes
launching them takes longer than running them. A CUDA graph records the
launches of one forward pass and replays them all in one call.

A graph is fixed: the same kernels, shapes and buffer addresses. So
`DecodeGraphs` owns static input buffers sized for the largest batch,
captures the model's forward once per size of a ladder (`capture_sizes`), and
for each decode step copies the step's inputs into the buffers, pads the
batch to the next captured size and replays that graph:

    step of 5 decodes -> graph of 8; rows 5..7 are padding:
      input_ids, positions  0     any token at any position
      slot_mapping          -1    writes no K/V (the cache write skips it)
      seq_lens              1     attends to slot 0 of block 0, read only
      block_tables          0

The attention plan of a captured step depends on the batch size only (the
decode kernel splits each context by its own length), so one graph serves
every mix of lengths up to max_model_len. Only the forward is captured: the
LM head over the sampling rows and the sampler run eagerly after it. Prefill
and mixed steps, and batches above the largest size, run eagerly too.

Off CUDA, `replay=False` runs the same padded, static-buffer forward eagerly:
the tests check the padding and the buffers that way.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.step import ScheduledSequence
from pagedserve.worker.inputs import flatten
from pagedserve.worker.layers.attention import AttentionMetadata, KVCache
from pagedserve.worker.transfer import to_device

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16; the last is max_num_seqs."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 64 else 16))
    return [size for size in sizes if size < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, backend, kv_caches: list[KVCache], *, block_size: int,
                 max_model_len: int, max_num_seqs: int, device: torch.device,
                 replay: bool = True) -> None:
        if not getattr(backend, "supports_graphs", False):
            raise ValueError(f"attention backend {backend.name!r} plans each step from its "
                             "lengths; decode graphs need the 'triton' backend")
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.use_replay = replay
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        self.max_blocks = cdiv(max_model_len, block_size)
        # Static inputs: rows input_ids, positions, slot_mapping.
        self._vectors = torch.zeros(3, max_bs, dtype=torch.int64, device=device)
        self._seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self._query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self.memory_bytes = 0

    def padded_size(self, num_seqs: int) -> int:
        return next(size for size in self.sizes if size >= num_seqs)

    def fits(self, seqs: list[ScheduledSequence]) -> bool:
        return len(seqs) <= self.sizes[-1] and all(seq.num_tokens == 1 for seq in seqs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool: a smaller graph
        reuses the larger ones' intermediate buffers, since only one replays at a time."""
        if not self.use_replay:
            return
        self._vectors[2].fill_(-1)  # every row is padding while capturing: no K/V written
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            metadata = self._metadata(size)
            self._forward(size, metadata)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size, metadata)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info("CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.0f MiB",
                    len(self.sizes), self.sizes[-1], self.capture_s, self.memory_bytes / 2**20)

    def load(self, seqs: list[ScheduledSequence]) -> tuple[int, torch.Tensor]:
        """Queue the copies of a decode-only step's inputs into the static buffers.
        Returns the captured size that `replay` must run, and the rows that sample."""
        arrays = flatten(seqs, self.block_size)
        num_seqs, width = arrays.block_tables.shape
        size = self.padded_size(num_seqs)
        vectors = np.zeros((3, size), np.int64)  # padding: token 0 at position 0, slot -1
        vectors[2, num_seqs:] = -1
        vectors[:, :num_seqs] = arrays.token_ids, arrays.positions, arrays.slots
        seq_lens = np.ones(size, np.int32)
        seq_lens[:num_seqs] = arrays.seq_lens
        tables = np.zeros((size, width), np.int32)
        tables[:num_seqs] = arrays.block_tables
        # Columns past `width` keep older steps' blocks: no row reads past its own length.
        for static, host in ((self._vectors[:, :size], vectors), (self._seq_lens[:size], seq_lens),
                             (self._block_tables[:size, :width], tables)):
            static.copy_(torch.from_numpy(host).pin_memory() if self.device.type == "cuda"
                         else torch.from_numpy(host), non_blocking=True)
        return size, to_device(torch.from_numpy(arrays.logits_rows), self.device)

    def replay(self, size: int, num_seqs: int) -> torch.Tensor:
        """Hidden states [num_seqs, hidden_size] of the loaded step, in its `seqs` order."""
        if self.use_replay:
            self._graphs[size].replay()
            out = self._outputs[size]
        else:
            out = self._forward(size, self._metadata(size))
        return out[:num_seqs]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._vectors[2, :size],
            query_start_loc=self._query_start_loc[:size + 1],
            seq_lens=self._seq_lens[:size],
            block_tables=self._block_tables[:size],
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            backend=self.backend,
            plan=self.backend.graph_plan(size, self.max_model_len, self.device),
        )

    def _forward(self, size: int, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(self._vectors[0, :size], self._vectors[1, :size], self.kv_caches,
                          metadata)
