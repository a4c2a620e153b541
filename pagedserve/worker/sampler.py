"""Token sampling as batched tensor ops over the rows that sample this step.

Order of operations (as in vLLM): penalties on the raw logits, then greedy rows
take the argmax; the others are divided by their temperature, filtered by
top-k, top-p and min-p, and sampled. Returned log-probabilities are always
those of the model's raw distribution (log-softmax of the unprocessed logits).

Sampling draws by "exponential race": argmax(probs / q) with q ~ Exp(1) is a
draw from `probs`, and needs only one random vector per row. A request with a
`seed` gets its vector from a generator seeded by (seed, index of the token
being sampled), so it samples the same tokens whatever batch it runs in,
however it was chunked or preempted.
"""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.scheduler.step import Sample, ScheduledSequence

_MASKED = float("-inf")


def sample(logits: torch.Tensor, seqs: list[ScheduledSequence],
           generator: torch.Generator) -> list[Sample]:
    """logits: [S, V] float32, one row per sampling sequence, in `seqs` order.

    A row with `num_samples` k > 1 yields k samples (the first samples of a
    parallel-sampling request); a row with `num_candidates` yields its best
    continuations for beam search. Samples come back in row order.
    """
    beam_rows = [i for i, seq in enumerate(seqs) if seq.num_candidates]
    if beam_rows:
        beams = beam_candidates(logits[beam_rows], [seqs[i] for i in beam_rows])
        rest = [i for i, seq in enumerate(seqs) if not seq.num_candidates]
        return beams + (sample(logits[rest], [seqs[i] for i in rest], generator) if rest else [])
    if any(seq.num_samples > 1 for seq in seqs):
        rows = [i for i, seq in enumerate(seqs) for _ in range(seq.num_samples)]
        # A row sampled once keeps its own sample index (a forked sample's).
        seqs = [dataclasses.replace(seq, num_samples=1, sample_index=seq.sample_index + k)
                for seq in seqs for k in range(seq.num_samples)]
        logits = logits[rows]
    params = [seq.sampling_params for seq in seqs]
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [S, 1]
    raw_logits = logits
    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits.clone(), seqs)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        drawn = _draw(logits[rows], [seqs[i] for i in random_rows], generator)
        tokens = tokens.index_copy(0, rows, drawn)

    token_logprobs = (raw_logits.gather(1, tokens[:, None]) - log_norm).squeeze(1)
    max_top = max((p.logprobs or 0) for p in params)
    top_values = top_ids = None
    if max_top > 0:
        top_values, top_ids = raw_logits.topk(max_top, dim=-1)
        top_values, top_ids = (top_values - log_norm).tolist(), top_ids.tolist()

    samples = []
    for i, (seq, token, logprob) in enumerate(zip(seqs, tokens.tolist(), token_logprobs.tolist())):
        top = None
        if params[i].logprobs is not None:
            top = {token: logprob}  # the sampled token first, then the k most likely
            k = params[i].logprobs
            if k:
                top.update((tid, value) for tid, value in zip(top_ids[i][:k], top_values[i][:k])
                           if tid not in top)
        samples.append(Sample(seq.seq_id, token, logprob, top))
    return samples


def beam_candidates(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> list[Sample]:
    """Each row's `num_candidates` most likely tokens by log-softmax of the raw logits."""
    logprobs = torch.log_softmax(logits, dim=-1)
    values, ids = logprobs.topk(max(seq.num_candidates for seq in seqs), dim=-1)
    samples = []
    for seq, row_ids, row_values in zip(seqs, ids.tolist(), values.tolist()):
        candidates = list(zip(row_ids[:seq.num_candidates], row_values[:seq.num_candidates]))
        samples.append(Sample(seq.seq_id, candidates[0][0], candidates[0][1], None, candidates))
    return samples


def apply_penalties(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
    """Repetition penalty over prompt + output (as HF and vLLM); presence and
    frequency penalties over the output only (as OpenAI). In place on `logits`."""
    vocab_size = logits.shape[1]
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        if not params.uses_penalties:
            continue
        output = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=logits.device)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=logits.device)
            seen = torch.cat([seen, output]).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                            values * params.repetition_penalty)
        if output.numel() and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(output, minlength=vocab_size).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts
            logits[row] -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _draw(logits: torch.Tensor, seqs: list[ScheduledSequence],
          generator: torch.Generator) -> torch.Tensor:
    params = [seq.sampling_params for seq in seqs]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    logits = _filter(logits, params)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, p in enumerate(params):
        if p.seed is not None:
            stream = _stream(p.seed, seqs[row].output_index, seqs[row].sample_index)
            seeded = torch.Generator(device=device).manual_seed(stream)
            noise[row].exponential_(generator=seeded)
    return (probs / noise).argmax(dim=-1)


def _filter(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Top-k, top-p and min-p on temperature-scaled logits: [S, V] -> [S, V]."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    device = logits.device
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab_size = logits.shape[1]
        k = torch.tensor([k if k > 0 else vocab_size for k in top_k], device=device)
        ranks = torch.arange(vocab_size, device=device)[None, :]
        drop = ranks >= k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, _MASKED).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
        drop[:, 0] = False  # the most likely token always survives
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, _MASKED))
    if any(p > 0.0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_p, device=device)[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, _MASKED)
    return logits


def _stream(seed: int, index: int, sample_index: int = 0) -> int:
    """A 63-bit generator seed for token `index` of sample `sample_index` of a seeded request."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9
            + sample_index * 0x94D049BB133111EB + 1) % (2**63)
