"""Token sampling as tensor ops over the whole batch, on the logits' device.

Order of operations (as in vLLM): penalties on the raw logits, the logits
controls (logit_bias, allowed_token_ids, and EOS and stop ids blocked before
min_tokens), a structured output's token mask (worker/token_masks.py), then
greedy rows
take the argmax; the others are divided by their temperature, filtered by
top-k, top-p and min-p, and sampled. Returned log-probabilities are always
those of the model's raw distribution (log-softmax of the unprocessed logits),
and are computed only for the rows that use them (`needs_logprobs`): the
others get NaN, and their outputs report no cumulative log-probability.

Per-row settings travel as one small tensor per kind (`SamplingBatch`), built
on the host from the step's sequences and copied without a sync; the only
copy back is one tensor holding every row's token, its log-probability and,
when asked, its top-k (`_to_host`). Beam-search rows use the same top-k.

Sampling draws by "exponential race": argmax(probs / q) with q ~ Exp(1) is a
draw from `probs`, and needs one random vector per row. Unseeded rows take it
from the runner's generator. A request with a `seed` takes it from a
counter-based hash of (seed, index of the token being sampled, sample index,
vocabulary id), so it samples the same tokens whatever batch it runs in,
however it was chunked or preempted, and every seeded row is drawn in one op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pagedserve.kernels import cpu_kernels
from pagedserve.scheduler.step import Sample, ScheduledSequence
from pagedserve.worker.token_masks import apply_token_bitmask_
from pagedserve.worker.transfer import to_device

_MASKED = float("-inf")


@dataclass
class SamplingBatch:
    """Each row's settings as tensors on the logits' device, and which ops the batch needs."""

    temperature: torch.Tensor  # [S] float32, 1.0 on greedy rows
    top_k: torch.Tensor  # [S] int64, vocab size where off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    random_rows: list[int]  # rows that sample (not greedy, not beam)
    seeded_rows: list[int]  # random rows with a seed
    streams: torch.Tensor | None  # [len(seeded_rows)] int64, one hash stream per seeded row
    use_top_k_p: bool
    use_min_p: bool
    penalties: _Penalties | None
    num_top: int  # the most top log-probabilities or beam candidates any row asks for
    logprob_rows: list[int] | None  # rows whose log-probabilities are used; None: every row
    # Structured outputs: the constrained rows, and their bitmask rows (in that order).
    mask_rows: torch.Tensor | None = None
    bitmask: torch.Tensor | None = None
    controls: _Controls | None = None  # logit_bias, allowed_token_ids, min_tokens

    @classmethod
    def build(cls, seqs: list[ScheduledSequence], vocab_size: int,
              device: torch.device, token_bitmask: torch.Tensor | None = None
              ) -> SamplingBatch:
        params = [seq.sampling_params for seq in seqs]
        rows = [(1.0 if p.greedy else p.temperature, p.top_k or vocab_size, p.top_p, p.min_p)
                for p in params]
        table = to_device(torch.tensor(rows, dtype=torch.float32), device)  # [S, 4]
        random_rows = [i for i, (seq, p) in enumerate(zip(seqs, params, strict=True))
                       if not p.greedy and seq.num_candidates is None]
        seeded_rows = [i for i in random_rows if params[i].seed is not None]
        streams = None
        if seeded_rows:
            streams = to_device(torch.tensor(
                [_stream(params[i].seed, seqs[i].output_index, seqs[i].sample_index)
                 for i in seeded_rows], dtype=torch.int64), device)
        sampled = [params[i] for i in random_rows]
        logprob_rows = [i for i, seq in enumerate(seqs) if needs_logprobs(seq)]
        constrained = [i for i, seq in enumerate(seqs) if seq.bitmask_row is not None]
        mask_rows = bitmask = None
        if constrained:
            mask_rows = to_device(torch.tensor(constrained), device)
            bitmask = to_device(token_bitmask[[seqs[i].bitmask_row for i in constrained]], device)
        return cls(
            temperature=table[:, 0], top_k=table[:, 1].long(), top_p=table[:, 2],
            min_p=table[:, 3], random_rows=random_rows,
            seeded_rows=seeded_rows, streams=streams,
            use_top_k_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            use_min_p=any(p.min_p > 0.0 for p in sampled),
            penalties=_Penalties.build(seqs, vocab_size, device),
            num_top=max(max((p.logprobs or 0) for p in params),
                        max(seq.num_candidates or 0 for seq in seqs)),
            logprob_rows=None if len(logprob_rows) == len(seqs) else logprob_rows,
            mask_rows=mask_rows, bitmask=bitmask,
            controls=_Controls.build(seqs, vocab_size, device),
        )


def needs_logprobs(seq: ScheduledSequence) -> bool:
    """Whether a row's log-probabilities are used: asked for, beam candidates, or the
    ranking of best_of > n samples."""
    params = seq.sampling_params
    return (params.logprobs is not None or seq.num_candidates is not None
            or params.best_of > params.n)


@dataclass
class _Penalties:
    repetition: torch.Tensor  # [S, 1], 1.0 where off
    presence: torch.Tensor  # [S, 1]
    frequency: torch.Tensor  # [S, 1]
    output_ids: torch.Tensor  # [S, L_out] int64, padded with vocab_size
    prompt_ids: torch.Tensor | None  # [S, L_prompt] int64, padded with vocab_size

    @classmethod
    def build(cls, seqs: list[ScheduledSequence], vocab_size: int,
              device: torch.device) -> _Penalties | None:
        params = [seq.sampling_params for seq in seqs]
        if not any(p.uses_penalties for p in params):
            return None
        values = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
                               for p in params], dtype=torch.float32)
        values = to_device(values, device)
        outputs = [seq.output_token_ids or [] for seq in seqs]
        prompts = [(seq.prompt_token_ids or []) if p.repetition_penalty != 1.0 else []
                   for seq, p in zip(seqs, params, strict=True)]
        return cls(values[:, 0:1], values[:, 1:2], values[:, 2:3],
                   _padded(outputs, vocab_size, device),
                   _padded(prompts, vocab_size, device) if any(prompts) else None)


@dataclass
class _Controls:
    """The logits controls of a batch's rows, as (row, token) index pairs on the device:
    biases added, tokens outside a row's allowed set and a row's blocked tokens (EOS
    and stop ids before min_tokens) set to -inf."""

    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, ids, values
    allowed_rows: torch.Tensor | None  # [R] the rows with allowed_token_ids
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # (index into allowed_rows, id)
    blocked: tuple[torch.Tensor, torch.Tensor] | None  # rows, ids

    @classmethod
    def build(cls, seqs: list[ScheduledSequence], vocab_size: int,
              device: torch.device) -> _Controls | None:
        bias, allowed_rows, allowed, blocked = [], [], [], []
        for row, seq in enumerate(seqs):
            params = seq.sampling_params
            for token, value in (params.logit_bias or {}).items():
                if token < vocab_size:
                    bias.append((row, token, value))
            if params.allowed_token_ids is not None:
                allowed.extend((len(allowed_rows), t) for t in params.allowed_token_ids
                               if t < vocab_size)
                allowed_rows.append(row)
            blocked.extend((row, t) for t in seq.blocked_token_ids or () if t < vocab_size)
            blocked.extend((row, t) for t in _bad_word_ends(params.bad_words_token_ids or (),
                                                            seq.output_token_ids or [])
                           if t < vocab_size)
        if not (bias or allowed_rows or blocked):
            return None

        def pairs(items, columns):
            table = torch.tensor(items, dtype=torch.float64).reshape(-1, columns)
            return tuple(to_device(table[:, i].long() if i < 2 else table[:, i].float(),
                                   device) for i in range(columns))

        return cls(pairs(bias, 3) if bias else None,
                   to_device(torch.tensor(allowed_rows), device) if allowed_rows else None,
                   pairs(allowed, 2) if allowed_rows else None,
                   pairs(blocked, 2) if blocked else None)


def _bad_word_ends(words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The tokens that would complete a bad word now: a one-token word always, a longer
    one where the output ends with all its tokens but the last."""
    return [ids[-1] for ids in words
            if len(ids) == 1 or (len(output) >= len(ids) - 1
                                 and tuple(output[len(output) - len(ids) + 1:]) == ids[:-1])]


def apply_controls(logits: torch.Tensor, controls: _Controls) -> torch.Tensor:
    """logit_bias, allowed_token_ids and the blocked ids, in place on `logits`."""
    if controls.bias is not None:
        rows, ids, values = controls.bias
        logits.index_put_((rows, ids), values.to(logits.dtype), accumulate=True)
    if controls.allowed_rows is not None:
        index, ids = controls.allowed
        keep = torch.zeros(len(controls.allowed_rows), logits.shape[1], dtype=torch.bool,
                           device=logits.device)
        keep[index, ids] = True
        rows = controls.allowed_rows
        logits[rows] = logits[rows].masked_fill(~keep, _MASKED)
    if controls.blocked is not None:
        logits[controls.blocked] = _MASKED
    return logits


def sample(logits: torch.Tensor, seqs: list[ScheduledSequence],
           generator: torch.Generator, token_bitmask: torch.Tensor | None = None
           ) -> list[Sample]:
    """logits: [S, V] float32, one row per sampling sequence, in `seqs` order.

    A row with `num_samples` k > 1 yields k samples (the first samples of a
    parallel-sampling request); a row with `num_candidates` yields its best
    continuations for beam search. A row with a `bitmask_row` samples only the
    tokens that row of `token_bitmask` allows. Samples come back in row order.
    """
    if any(seq.num_samples > 1 for seq in seqs):
        rows = [i for i, seq in enumerate(seqs) for _ in range(seq.num_samples)]
        # A row sampled once keeps its own sample index (a forked sample's).
        seqs = [dataclasses.replace(seq, num_samples=1, sample_index=seq.sample_index + k)
                for seq in seqs for k in range(seq.num_samples)]
        logits = logits[to_device(torch.tensor(rows), logits.device)]
    batch = SamplingBatch.build(seqs, logits.shape[1], logits.device, token_bitmask)
    tokens, token_logprobs, top_values, top_ids = sample_tensors(logits, batch, generator)
    rows = _to_host(tokens, token_logprobs, top_values, top_ids)
    return [_make_sample(seq, row, batch.num_top) for seq, row in zip(seqs, rows, strict=True)]


def distributions(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
    """[S, V] what the sampler draws from for rows of sampling (temperature > 0)
    sequences without penalties, controls or masks: temperature, then top-k, top-p
    and min-p (speculative decoding's verifier reads them)."""
    batch = SamplingBatch.build(seqs, logits.shape[1], logits.device)
    return _filter(logits / batch.temperature[:, None], batch).softmax(dim=-1)


def sample_tensors(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator):
    """Everything on the device: [S] tokens, [S] their raw log-probabilities, and the
    [S, num_top] best raw log-probabilities with their ids (None when nobody asks)."""
    log_norm = _log_norm(logits, batch.logprob_rows)  # [S, 1]
    raw_logits = logits
    if batch.penalties is not None or batch.controls is not None or batch.bitmask is not None:
        logits = logits.clone()  # processed for choosing; logprobs read the raw ones
    if batch.penalties is not None:
        apply_penalties(logits, batch.penalties)
    if batch.controls is not None:
        apply_controls(logits, batch.controls)
    if batch.bitmask is not None:
        apply_token_bitmask_(logits, batch.bitmask, batch.mask_rows)
    tokens = _argmax(logits)
    if batch.random_rows:
        rows = to_device(torch.tensor(batch.random_rows), logits.device)
        drawn = _draw(logits[rows], _select(batch, batch.random_rows), generator)
        tokens = tokens.index_copy(0, rows, drawn)
    top_values = top_ids = None
    if batch.num_top > 0:
        top_values, top_ids = raw_logits.topk(batch.num_top, dim=-1)
        top_values = top_values - log_norm
    token_logprobs = (raw_logits.gather(1, tokens[:, None]) - log_norm).squeeze(1)
    return tokens, token_logprobs, top_values, top_ids


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens, [S] int64; on the CPU through the C++ kernel where it is built."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.is_contiguous() and cpu_kernels.usable()):
        return cpu_kernels.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _log_norm(logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """logsumexp of each row that needs it, NaN for the others: [S, 1]."""
    if rows is None:
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    log_norm = torch.full((logits.shape[0], 1), float("nan"), device=logits.device)
    if rows:
        index = to_device(torch.tensor(rows), logits.device)
        log_norm.index_copy_(0, index, torch.logsumexp(logits[index], dim=-1, keepdim=True))
    return log_norm


def apply_penalties(logits: torch.Tensor, penalties: _Penalties) -> torch.Tensor:
    """Repetition penalty over prompt + output (as HF and vLLM); presence and
    frequency penalties over the output only (as OpenAI). In place on `logits`."""
    num_rows, vocab_size = logits.shape
    # Counts over vocab_size + 1 columns: the last one takes the padding.
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, penalties.output_ids, torch.ones_like(penalties.output_ids,
                                                                   dtype=logits.dtype))
    counts = counts[:, :vocab_size]
    seen = counts > 0
    if penalties.prompt_ids is not None:
        in_prompt = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, penalties.prompt_ids, True)
        seen |= in_prompt[:, :vocab_size]
    repetition = penalties.repetition.expand_as(logits)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= penalties.frequency * counts
    logits -= penalties.presence * (counts > 0).to(logits.dtype)
    return logits


def _draw(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator) -> torch.Tensor:
    """Rows of `batch` are exactly the rows of `logits` here: all of them sample."""
    logits = logits / batch.temperature[:, None]
    logits = _filter(logits, batch)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    if batch.seeded_rows:
        rows = to_device(torch.tensor(batch.seeded_rows), noise.device)
        noise.index_copy_(0, rows, _hashed_exponential(batch.streams, probs.shape[1]))
    return (probs / noise).argmax(dim=-1)


def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, top-p and min-p on temperature-scaled logits: [S, V] -> [S, V]."""
    if batch.use_top_k_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
        drop = ranks >= batch.top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, _MASKED).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= batch.top_p[:, None]
        drop[:, 0] = False  # the most likely token always survives
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, _MASKED))
    if batch.use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, _MASKED)
    return logits


def _select(batch: SamplingBatch, rows: list[int]) -> SamplingBatch:
    """The batch restricted to `rows` (the random ones); seeded rows renumbered."""
    index = to_device(torch.tensor(rows), batch.temperature.device)
    position = {row: i for i, row in enumerate(rows)}
    return dataclasses.replace(
        batch, temperature=batch.temperature[index], top_k=batch.top_k[index],
        top_p=batch.top_p[index], min_p=batch.min_p[index],
        random_rows=list(range(len(rows))),
        seeded_rows=[position[row] for row in batch.seeded_rows])


# -- seeded noise -----------------------------------------------------------------------

def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def _hashed_exponential(streams: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R] int64 streams -> [R, V] float32 Exp(1) noise, a pure function of (stream, column)."""
    columns = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=streams.device)
    bits = _splitmix64(streams[:, None] + columns[None, :] * _GOLDEN)
    uniform = (_shift_right(bits, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return (-torch.log(uniform)).float()


def _stream(seed: int, index: int, sample_index: int = 0) -> int:
    """A 63-bit stream for token `index` of sample `sample_index` of a seeded request."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9
            + sample_index * 0x94D049BB133111EB + 1) % (2**63)


# -- host <-> device ------------------------------------------------------------------------

def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    values = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return to_device(values, device)


def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor, top_values: torch.Tensor | None,
             top_ids: torch.Tensor | None) -> list[list[float]]:
    """One copy to the host: per row [token, logprob, top ids..., top values...].

    float64 holds every token id exactly (ids < 2**53) and every float32 value.
    """
    parts = [tokens[:, None].double(), logprobs[:, None].double()]
    if top_ids is not None:
        parts += [top_ids.double(), top_values.double()]
    return torch.cat(parts, dim=1).tolist()


def _make_sample(seq: ScheduledSequence, row: list[float], num_top: int) -> Sample:
    top_ids = [int(t) for t in row[2:2 + num_top]]
    top_values = row[2 + num_top:]
    if seq.num_candidates is not None:
        k = seq.num_candidates
        candidates = list(zip(top_ids[:k], top_values[:k], strict=True))
        return Sample(seq.seq_id, candidates[0][0], candidates[0][1], None, candidates)
    token, logprob = int(row[0]), row[1]
    top = None
    k = seq.sampling_params.logprobs
    if k is not None:
        top = {token: logprob}  # the sampled token first, then the k most likely
        top.update((tid, value) for tid, value in zip(top_ids[:k], top_values[:k], strict=True)
                   if tid not in top)
    return Sample(seq.seq_id, token, logprob, top)
