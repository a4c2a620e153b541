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
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
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
from pagedserve.worker.spec_verify import verify_greedy
from pagedserve.worker.token_masks import BITS_PER_WORD, PendingBitmask

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


def _uniform(a: int, b: int) -> float:
    """A deterministic draw in [0, 1) for the pair, independent of its neighbours'
    (splitmix64's finaliser)."""
    mask = (1 << 64) - 1
    z = ((a << 32) + b + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 11) / 2**53


class _OnDevice:
    """A step queued on the simulated device: its output, and when the device is done.

    A step whose mask the engine fills late samples once the mask is in: its
    output is computed then, and the device is done no earlier than that.
    """

    def __init__(self, output: StepOutput | None, done_at: float,
                 mask: PendingBitmask | None = None,
                 sample: Callable[[], StepOutput] | None = None) -> None:
        self.output, self.done_at = output, done_at
        self._mask, self._sample = mask, sample

    def result(self) -> StepOutput | None:
        if self._sample is not None:
            assert self._mask is not None
            self._mask.wait()
            self.output, self._sample = self._sample(), None
        remaining = self.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return self.output


def simulated_roofline(info: ModelInfo, engine: EngineConfig, tp_size: int) -> Roofline:
    """Step times of the simulated GPU engine.simulator names, for this model and TP."""
    if engine.simulator is None:
        raise ValueError("a simulated roofline needs engine.simulator")
    dtype_bytes = info.dtype.itemsize
    return Roofline(GPUS[engine.simulator.gpu], info.shape, tp_size, dtype_bytes,
                    kv_dtype_bytes(engine, dtype_bytes))


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
        self.roofline = simulated_roofline(info, engine, tp_size)
        self.tp_size = tp_size
        self.block_bytes = engine.block_size * self.roofline.kv_bytes_per_token
        self.weight_bytes = self.roofline.weight_bytes  # what the simulated GPU would hold
        # A draft model (speculative decoding), split like the target: its steps' times,
        # weights and KV too.
        self.draft_roofline = None if info.draft is None else simulated_roofline(
            info.draft, engine, tp_size)
        if self.draft_roofline is not None:
            self.block_bytes += engine.block_size * self.draft_roofline.kv_bytes_per_token
            self.weight_bytes += self.draft_roofline.weight_bytes
        self.text = text_tokens(info.model_dir, info.vocab_size)
        eos = sorted(info.eos_token_ids)
        self.eos_token_id = eos[0] if eos else None
        self.num_blocks = 0
        self._free_at = 0.0  # when the device finishes what it was given
        self._late_mask: PendingBitmask | None = None  # the last step's, filled late

    # -- memory ------------------------------------------------------------------------
    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        """Blocks of the KV budget the GPU would leave, as the planner computes it."""
        headroom = headroom_bytes(self.shape, self.tp_size, self.dtype_bytes,
                                  max_num_batched_tokens, self.engine.max_num_seqs)
        budget = gpu_kv_budget(self.gpu.memory_bytes, self.engine.gpu_memory_utilization,
                               self.weight_bytes, headroom, self.tp_size,
                               gpu=f"simulated {self.gpu.name}")
        return budget // self.block_bytes

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks  # nothing to allocate: there is no device memory

    # -- a step -----------------------------------------------------------------------
    def step_time(self, step: StepInput) -> float:
        target = self.roofline.step_time([
            StepShape(seq.num_tokens, seq.context_len,
                      seq.do_sample + len(seq.draft_token_ids or ())) for seq in step.seqs])
        if self.draft_roofline is None:
            return target
        return target + self._draft_time(step)

    def _draft_time(self, step: StepInput) -> float:
        """The draft model's passes (worker/draft.py) for the sequences that ask: one
        over the tokens its cache lacks and the step's (its refused drafts' too: an
        upper bound), then a decode pass per proposal after the first."""
        assert self.draft_roofline is not None
        asking = [seq for seq in step.seqs if seq.num_proposals]
        if not asking:
            return 0.0
        first = self.draft_roofline.step_time([
            StepShape(len(seq.draft_context or ()) + seq.num_tokens + 1, seq.context_len + 1,
                      1) for seq in asking])
        passes = max(seq.num_proposals for seq in asking) - 1
        context = sum(seq.context_len for seq in asking) // len(asking)
        return first + passes * self.draft_roofline.decode_time(len(asking), 0, context)

    def submit(self, step: StepInput) -> _OnDevice:
        """Queue a step on the simulated device and return at once: it starts when the
        device is free and ends its device time later; rank 0 then has its samples.
        A step with a late mask cannot sample before the mask is in, and the next
        step cannot start before it has."""
        arrived = time.perf_counter()  # the roofline's arithmetic below is not the device's
        device_s = self.step_time(step)
        if self._late_mask is not None:  # filled by now: the engine fills before sending on
            if not self._late_mask.is_ready:
                raise RuntimeError("a step was sent before the mask of the one before it")
            self._free_at = max(self._free_at, self._late_mask.ready_at or 0.0)
            self._late_mask = None
        start = max(arrived, self._free_at)
        self._free_at = start + device_s
        if self.rank != 0:
            return _OnDevice(None, self._free_at)
        bitmask = step.token_bitmask
        if isinstance(bitmask, PendingBitmask):
            self._late_mask = bitmask
            return _OnDevice(None, self._free_at, bitmask,
                             lambda: self._outputs(step, device_s, bitmask.tensor))
        return _OnDevice(self._outputs(step, device_s, bitmask), self._free_at)

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run a step: sleep through its device time."""
        return self.submit(step).result()

    def _outputs(self, step: StepInput, device_s: float, bitmask) -> StepOutput:
        samples: list[Sample] = []
        scored: list[PromptLogprobs] = []
        drawn: list[tuple[ScheduledSequence, int, int]] = []  # (seq, sample index, token)
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
            if seq.draft_token_ids or seq.num_proposals:
                samples.append(self._verified(seq, bitmask))
                continue
            for sample_index in range(seq.sample_index, seq.sample_index + seq.num_samples):
                drawn.append((seq, sample_index, self._draw(seq, sample_index)))
        constrained = [i for i, (seq, _, _) in enumerate(drawn) if seq.bitmask_row is not None]
        if constrained:
            rows = bitmask[[drawn[i][0].bitmask_row for i in constrained]]
            allowed = _allowed([drawn[i][2] for i in constrained], rows)
            for i, token in zip(constrained, allowed, strict=True):
                drawn[i] = (*drawn[i][:2], token)
        samples += [self._sample(seq, sample_index, token) for seq, sample_index, token in drawn]
        return StepOutput(samples=samples, prompt_logprobs=scored, device_s=device_s)

    def _verified(self, seq: ScheduledSequence, bitmask: torch.Tensor | None = None) -> Sample:
        """A speculating sequence: its drafts kept while they are the text's next tokens
        (where its mask rows allow them, each row's allowed token), then the text's token
        after them (as greedy verification keeps a target's)."""
        draft = seq.draft_token_ids or []
        targets = [self._draw(seq, seq.sample_index, ahead) for ahead in range(len(draft) + 1)]
        if seq.bitmask_row is not None and bitmask is not None:
            row = seq.bitmask_row
            targets = _allowed(targets, bitmask[row:row + len(targets)])
        tokens = verify_greedy(targets, draft)
        logprob = self._logprob(seq, 0)
        return Sample(seq.seq_id, tokens[-1], logprob,
                      accepted=[(token, logprob) for token in tokens[:-1]],
                      proposals=self._proposals(seq, len(tokens)) or None)

    def _proposals(self, seq: ScheduledSequence, ahead: int) -> list[int]:
        """A simulated draft model's tokens after the `ahead` this step gives: the text's
        next ones while a draw (deterministic, per sequence and place) falls under
        simulator.draft_acceptance, then other words of the text."""
        proposals: list[int] = []
        missed = False
        for i in range(seq.num_proposals):
            place = seq.output_index + ahead + i
            token = self._draw(seq, seq.sample_index, ahead + i)
            missed = missed or _uniform(seq.seq_id, place) >= self.sim.draft_acceptance
            proposals.append(self.text[_spread(place, 7) % len(self.text)] if missed else token)
        return proposals

    def _draw(self, seq: ScheduledSequence, sample_index: int, ahead: int = 0) -> int:
        """The token the text gives (EOS where the config asks for it), `ahead` tokens
        past the one this step samples."""
        eos_after = self.sim.eos_after
        if (eos_after is not None and self.eos_token_id is not None
                and seq.output_index + ahead + 1 >= eos_after):
            return self.eos_token_id
        return self._token(seq, sample_index, 0, ahead)

    def _sample(self, seq: ScheduledSequence, sample_index: int, token: int) -> Sample:
        params = seq.sampling_params
        logprob = self._logprob(seq, 0)
        top = None
        if params is not None and params.logprobs is not None:
            top = {token: logprob}  # the most likely token: top-k holds it and k - 1 more
            for rank in range(1, params.logprobs):
                top.setdefault(self._token(seq, sample_index, rank), self._logprob(seq, rank))
        return Sample(seq.seq_id, token, logprob, top)

    def _token(self, seq: ScheduledSequence, sample_index: int, rank: int,
               ahead: int = 0) -> int:
        """The text's next token for this sequence (rank 0), or an alternative to it."""
        seed = seq.sampling_params.seed if seq.sampling_params else None
        start = _spread(seq.seq_id if seed is None else seed, sample_index)
        position = start + seq.output_index + ahead
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


def _allowed(tokens: list[int], words: torch.Tensor) -> list[int]:
    """Structured outputs' tokens, a row of masks `words` ([rows, words] int32) each: the
    text's token where its mask allows it, else the lowest allowed id, so the grammar
    advances as it would on a GPU. One pass over the batch's masks, their first words
    first (grammars mostly allow some of a vocabulary's low ids: ASCII, digits)."""
    token = torch.tensor(tokens, dtype=torch.int64)
    word = words[torch.arange(len(tokens)), token // BITS_PER_WORD].to(torch.int64)
    refused = ((word >> (token % BITS_PER_WORD)) & 1 == 0).nonzero().flatten()
    if not len(refused):
        return tokens
    for width in (_HEAD_WORDS, words.shape[1]):
        nonzero = words[refused, :width] != 0
        found = nonzero.any(dim=1)
        first = nonzero.to(torch.uint8).argmax(dim=1)  # the first word with an allowed token
        word = words[refused, first].to(torch.int64) & 0xFFFFFFFF
        lowest = torch.log2((word & -word).to(torch.float64)).to(torch.int64)  # its lowest bit
        token[refused[found]] = (first * BITS_PER_WORD + lowest)[found]
        refused = refused[~found]  # none in the first words: look at all of them
        if not len(refused):
            break
    return token.tolist()  # a row that allows nothing keeps the text's token


_HEAD_WORDS = 64
