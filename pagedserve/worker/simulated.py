"""A simulated accelerator: a worker that behaves, in time and memory, like a GPU.

It holds no weights and does no arithmetic. What the engine sees is what a
GPU worker gives it:

- **Memory:** the KV pool is sized as the GPU's would be, by the planner's
  rule (model/rules.py, gpu_kv_budget): `gpu_memory_utilization` of the GPU's
  memory, less the rank's weights (at the size a quantized checkpoint's, or
  model.quantization="fp8"'s, hold them: model/shape.py) and the activation
  headroom of the largest step, in blocks of engine.kv_cache_dtype's bytes.
- **Time:** a step takes the time the roofline model gives (model/roofline.py),
  spent asleep, so the host's CPU is free as it would be beside a real GPU.
  The engine's host work is then measured against real device time.
- **Tokens:** deterministic tokens read from a text through the real
  tokenizer, so detokenizing and stop strings do their real work. Each
  sequence starts at its own place in the text. EOS comes only when the
  config asks (`simulator.eos_after`). Log-probabilities, when asked, are
  plausible numbers: the sampled token at -0.1 to -2.6, alternatives below.

With tensor parallelism every rank sleeps the same step (all-reduces
included) and rank 0 returns the samples, as real ranks do.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from pagedserve.config import EngineConfig
from pagedserve.model.info import ModelInfo
from pagedserve.model.roofline import GPUS, Roofline, StepShape
from pagedserve.model.rules import gpu_kv_budget, kv_dtype_bytes
from pagedserve.model.shape import headroom_bytes
from pagedserve.scheduler.step import (
    PromptLogprobs,
    Sample,
    ScheduledSequence,
    StepInput,
    StepOutput,
)
from pagedserve.worker.token_masks import BITS_PER_WORD

# How many alternatives a token has in the simulated distribution.
_ALTERNATIVES = 20


def text_tokens(model_dir: Path, vocab_size: int) -> list[int]:
    """The bundled text through the model's tokenizer: the simulated model's output."""
    text = resources.files("pagedserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    else:  # no tokenizer (skip_tokenizer_init): tokens are bytes, offset past the specials
        ids = [256 + byte for byte in text.encode()]
    ids = [token for token in ids if token < vocab_size]
    if not ids:
        raise ValueError(f"the simulator's text has no token below vocab_size={vocab_size}")
    return ids


def _spread(a: int, b: int) -> int:
    """A deterministic, well-spread hash of two integers (multiplicative hashing)."""
    return ((a * 0x9E3779B1 + b * 0x85EBCA77) & 0xFFFFFFFF) * 0xC2B2AE3D >> 7


class _OnDevice:
    """A step queued on the simulated device: its output, and when the device is done."""

    def __init__(self, output: StepOutput | None, done_at: float) -> None:
        self.output, self.done_at = output, done_at

    def result(self) -> StepOutput | None:
        remaining = self.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return self.output


class SimulatedWorker:
    def __init__(self, info: ModelInfo, engine: EngineConfig, rank: int = 0,
                 tp_size: int = 1) -> None:
        if engine.simulator is None:
            raise ValueError("SimulatedWorker needs engine.simulator")
        self.info, self.engine, self.rank = info, engine, rank
        self.sim = engine.simulator
        self.gpu = GPUS[self.sim.gpu]
        self.shape = info.shape  # its weights held as model.quantization asks
        self.dtype_bytes = info.dtype.itemsize
        self.roofline = Roofline(self.gpu, self.shape, tp_size, self.dtype_bytes,
                                 kv_dtype_bytes(engine, self.dtype_bytes))
        self.tp_size = tp_size
        self.block_bytes = engine.block_size * self.roofline.kv_bytes_per_token
        self.weight_bytes = self.roofline.weight_bytes  # what the simulated GPU would hold
        self.text = text_tokens(info.model_dir, info.vocab_size)
        eos = sorted(info.eos_token_ids)
        self.eos_token_id = eos[0] if eos else None
        self.num_blocks = 0
        self._free_at = 0.0  # when the device finishes what it was given

    # -- memory ------------------------------------------------------------------------
    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        """Blocks of the KV budget the GPU would leave, as the planner computes it."""
        headroom = headroom_bytes(self.shape, self.tp_size, self.dtype_bytes,
                                  max_num_batched_tokens, self.engine.max_num_seqs)
        budget = gpu_kv_budget(self.gpu.memory_bytes, self.engine.gpu_memory_utilization,
                               self.roofline.weight_bytes, headroom, self.tp_size,
                               gpu=f"simulated {self.gpu.name}")
        return budget // self.block_bytes

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks  # nothing to allocate: there is no device memory

    # -- a step -----------------------------------------------------------------------
    def step_time(self, step: StepInput) -> float:
        return self.roofline.step_time([
            StepShape(seq.num_tokens, seq.context_len, seq.do_sample) for seq in step.seqs])

    def submit(self, step: StepInput) -> _OnDevice:
        """Queue a step on the simulated device and return at once: it starts when the
        device is free and ends its device time later; rank 0 then has its samples."""
        device_s = self.step_time(step)
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + device_s
        output = self._outputs(step, device_s) if self.rank == 0 else None
        return _OnDevice(output, self._free_at)

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run a step: sleep through its device time."""
        return self.submit(step).result()

    def _outputs(self, step: StepInput, device_s: float) -> StepOutput:
        samples: list[Sample] = []
        scored: list[PromptLogprobs] = []
        for seq in step.seqs:
            if seq.prompt_targets:
                scored.append(self._prompt_logprobs(seq))
            if not seq.do_sample:
                continue
            if seq.num_candidates is not None:
                candidates = [(self._token(seq, seq.sample_index, rank), self._logprob(seq, rank))
                              for rank in range(seq.num_candidates)]
                samples.append(Sample(seq.seq_id, *candidates[0], None, candidates))
                continue
            for sample_index in range(seq.sample_index, seq.sample_index + seq.num_samples):
                samples.append(self._sample(seq, sample_index, step.token_bitmask))
        return StepOutput(samples=samples, prompt_logprobs=scored, device_s=device_s)

    def _sample(self, seq: ScheduledSequence, sample_index: int, token_bitmask=None) -> Sample:
        params = seq.sampling_params
        eos_after = self.sim.eos_after
        if (eos_after is not None and self.eos_token_id is not None
                and seq.output_index + 1 >= eos_after):
            token = self.eos_token_id
        else:
            token = self._token(seq, sample_index, 0)
        if seq.bitmask_row is not None:
            token = _allowed(token, token_bitmask[seq.bitmask_row])
        logprob = self._logprob(seq, 0)
        top = None
        if params is not None and params.logprobs is not None:
            top = {token: logprob}  # the most likely token: top-k holds it and k - 1 more
            for rank in range(1, params.logprobs):
                top.setdefault(self._token(seq, sample_index, rank), self._logprob(seq, rank))
        return Sample(seq.seq_id, token, logprob, top)

    def _token(self, seq: ScheduledSequence, sample_index: int, rank: int) -> int:
        """The text's next token for this sequence (rank 0), or an alternative to it."""
        seed = seq.sampling_params.seed if seq.sampling_params else None
        start = _spread(seq.seq_id if seed is None else seed, sample_index)
        position = start + seq.output_index
        if rank:
            position = _spread(position, rank)
        return self.text[position % len(self.text)]

    @staticmethod
    def _logprob(seq: ScheduledSequence, rank: int) -> float:
        """Plausible and deterministic: the sampled token near -0.1 to -2.6, each
        alternative lower than the one before."""
        return -0.1 - _spread(seq.seq_id, seq.output_index) % 2500 / 1000 - 1.5 * rank

    def _prompt_logprobs(self, seq: ScheduledSequence) -> PromptLogprobs:
        entries = []
        for offset, target in enumerate(seq.prompt_targets):
            value = -0.5 - _spread(target, seq.start_pos + offset) % 4000 / 1000
            entry = {target: value}
            for rank in range(1, seq.prompt_logprobs + 1):
                entry.setdefault(self.text[_spread(target, rank) % len(self.text)],
                                 -0.2 - 1.2 * rank)
            entries.append(entry)
        return PromptLogprobs(seq.seq_id, seq.start_pos, entries)


def _allowed(token: int, words) -> int:
    """A structured output's token: the text's where its mask allows it, else the lowest
    allowed id, so the grammar advances as it would on a GPU."""
    if (int(words[token // BITS_PER_WORD]) >> (token % BITS_PER_WORD)) & 1:
        return token
    nonzero = words.nonzero()
    if not len(nonzero):
        return token
    index = int(nonzero[0])
    word = int(words[index]) & 0xFFFFFFFF
    return index * BITS_PER_WORD + (word & -word).bit_length() - 1  # its lowest set bit
