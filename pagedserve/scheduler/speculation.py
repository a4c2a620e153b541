"""Speculative decoding's host side: how many tokens a step speculates, a
verified step's outcome, and the counts.

A speculating sequence's step computes its newest token and the proposer's
draft tokens (plan.py). The worker keeps the drafts the target agrees with
and samples one token after them (worker/spec_verify.py). Here the kept
drafts join the sequence, and the slots of the refused ones go back:
`num_computed_tokens` steps back by as many, and blocks only they used
return to the pool. No prefix-cache key is ever made from a refused token:
keys are made from the sequence's own tokens only (block_manager.py).

Speculation pays while the device has compute to spare: a decode step reads
every weight for one token per sequence, and verifying more costs little.
Where the step is compute-bound (a large batch on a GPU, a small model on a
CPU) the drafts' FLOPs cost time, and refused drafts are work thrown away.
`SpeculationPolicy` picks each step's draft length j, 0 (plain) to k:

    rate(j) = B (1 + f (a + a^2 + ... + a^j)) / cost(B, f B j)

with B sequences decoding, f the share of them the proposer finds drafts
for, and a the chance that a draft is kept given the ones before it were
(so a run of j drafts keeps a + ... + a^j on average). f and a are measured
over recent steps. `cost(B, D)` is the device's step time with D drafts:
the roofline's on a simulated GPU (model/roofline.py, engine/speculation.py),
else a line fitted to the measured decode steps (`MeasuredCost`). A
speculating step also pays the host's work between steps, which plain steps
overlap with the device's: its measured wall time less its device time
(`SpecStats.sync_host`) is added to its cost, so longer drafts amortise it;
until it is measured at a batch size, the host work the engine measured per
sequence in its steps (`SpecStats.host_per_seq`) stands in.
What the models still miss is weighed by measuring: where both ways have
been measured at a batch size (in powers of two, `MeasuredRates`), the one
whose recent steps gave more tokens per second goes, and the model picks how
far to speculate. The first speculating step after plain ones is timed apart:
it pays for the switch (the overlap ends, a draft model catches up), which
spaces the probes out. Acceptance and coverage follow recent
sequences, not steps, so a step of 256 weighs more than a step of one. Now and
then `probe_len` steps go the other way (plain while speculating, full length
while plain), so f, a and both rates stay current: after `probe_every` steps,
then twice as many while the probes change nothing, and never so often that
the probes cost more than `probe_share` of the time at the rates measured
(where the model says plain at a batch size not measured yet: at the rates it
models, with a draft model's catch-up, `switch_cost`); none into speculating
where the model and the measured steps agree on plain (it would only cost;
acceptance measured at other batch sizes still moves the model).
`disable_by_batch_size` (vLLM's) is a hard ceiling on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.proposers import Proposer
from pagedserve.scheduler.sequence import Sequence
from pagedserve.scheduler.step import Sample, ScheduledSequence, StepInput

# Seconds of a decode step of `sequences` sequences with `drafts` draft tokens among
# them, at a mean context of `context` positions.
StepCost = Callable[[int, int, int], float]

# How fast the measured figures follow the recent steps.
_WEIGHT = 0.1
# Acceptance and coverage follow recent sequences, not steps: a step of this many
# sequences weighs _WEIGHT, one of n sequences as n / this many such steps would.
_SEQS_PER_WEIGHT = 8


def _follow(seen: float | None, value: float) -> float:
    """A recent figure moved toward the newest value (the value, for the first)."""
    return value if seen is None else seen + _WEIGHT * (value - seen)


def _probe_wait(probe_len: int, share: float, step_s: float, slower: float,
                switch_s: float) -> int:
    """Steps between probes of `probe_len` steps the slower way (at `slower` times the
    faster way's rate, after a switch of `switch_s` seconds) for them to cost at most
    `share` of the time, at `step_s` a step the faster way."""
    lost = probe_len * (1.0 - slower) * step_s + switch_s
    return math.ceil(lost / (share * step_s))


def _weight(sequences: int) -> float:
    """The weight of a step's acceptance or coverage measured over `sequences`: at most
    a half, so one step's figure never stands alone."""
    return min(0.5, 1.0 - (1.0 - _WEIGHT) ** max(1.0, sequences / _SEQS_PER_WEIGHT))


@dataclass
class MeasuredCost:
    """A device's decode step time as fixed + per_token x tokens, fitted by least
    squares to the decode steps seen, the recent ones weighing most. None until the
    steps seen differ enough in size to tell the two apart."""

    decay: float = 0.98
    # Weighted sums: of 1, x, x^2, y and x y (x: tokens, y: seconds).
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)

    def observe(self, tokens: int, seconds: float) -> None:
        self._sums = [self.decay * total + term for total, term in zip(
            self._sums, (1.0, tokens, tokens * tokens, seconds, tokens * seconds),
            strict=True)]

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None."""
        n, x, xx, y, xy = self._sums
        spread = n * xx - x * x
        if n < 4 or spread <= 0.25 * n * n:  # sizes within a token of each other
            return None
        per_token = max(0.0, (n * xy - x * y) / spread)
        return max(0.0, (y - per_token * x) / n), per_token

    def __call__(self, sequences: int, drafts: int, context: int) -> float | None:
        line = self.line()
        if line is None:
            return None
        fixed, per_token = line
        return fixed + per_token * (sequences + drafts)


@dataclass
class MeasuredRates:
    """Output tokens per second of recent steps that speculated and that did not, by
    batch size (in powers of two): the host's work counts here, which no step-time
    model sees (a speculating step is taken in before the next is planned, so its
    host work does not overlap the device's)."""

    # Measured steps of each kind before the two are compared: a probe's into
    # speculating. Of its probe_len (4) steps, the first is planned while a plain one
    # runs (with asynchronous scheduling), so no sequence knows its newest token to
    # draft from; the next is the switch, timed apart.
    min_steps: int = 2
    _rates: dict[tuple[int, bool], float] = field(default_factory=dict)
    _steps: dict[tuple[int, bool], int] = field(default_factory=dict)
    # Seconds of the first speculating step after plain ones, by batch size.
    _switches: dict[int, float] = field(default_factory=dict)

    def observe_switch(self, decodes: int, seconds: float) -> None:
        bucket = decodes.bit_length()
        self._switches[bucket] = _follow(self._switches.get(bucket), seconds)

    def observe(self, decodes: int, speculated: bool, tokens: int, seconds: float) -> None:
        key = (decodes.bit_length(), speculated)
        rate = tokens / seconds
        self._rates[key] = _follow(self._rates.get(key), rate)
        self._steps[key] = self._steps.get(key, 0) + 1

    def speculating_is_faster(self, decodes: int) -> bool | None:
        """Whether recent speculating steps at this batch size gave more tokens per second
        than plain ones; None until both are measured."""
        bucket = decodes.bit_length()
        if min(self._steps.get((bucket, mode), 0) for mode in (False, True)) < self.min_steps:
            return None
        return self._rates[(bucket, True)] > self._rates[(bucket, False)]

    def affordable_wait(self, decodes: int, probe_len: int, share: float) -> int:
        """Steps between probes of `probe_len` steps the slower way for them to cost at
        most `share` of the time at this batch size (0 until both ways are measured): a
        probe loses what the slower way gives less, and a probe into speculating also
        its switch's time beyond a speculating step's."""
        if self.speculating_is_faster(decodes) is None:
            return 0
        bucket = decodes.bit_length()
        plain, speculating = self._rates[(bucket, False)], self._rates[(bucket, True)]
        switch_s = (max(0.0, self._switches.get(bucket, 0.0) - decodes / speculating)
                    if plain > speculating else 0.0)
        return _probe_wait(probe_len, share, decodes / max(plain, speculating),
                           min(plain, speculating) / max(plain, speculating), switch_s)


@dataclass
class SpecStats:
    """What speculation proposed and what the target kept (vLLM's figures), and the
    recent figures the policy reads."""

    verifications: int = 0  # one per speculating sequence and step
    draft_tokens: int = 0
    accepted_tokens: int = 0
    decode_steps: int = 0  # steps with a sequence decoding
    speculating_steps: int = 0  # those the policy let speculate
    # Recent chance a draft is kept given those before it were, and share of decoding
    # sequences given drafts (priors until measured).
    recent_acceptance: float = 0.5
    recent_coverage: float = 0.5
    steps_one_way: int = 0  # steps since the policy last probed the other way
    probe_wait: int = 0  # steps between probes (0: the policy's probe_every)
    probing_from: bool = False  # whether the steps speculated when the probe began
    probing_after: int | None = None  # the wait a probe under way began after
    probe_bucket: int = 0  # the batch size (its bit length) the probe wait is for
    measured: MeasuredCost = field(default_factory=MeasuredCost)
    rates: MeasuredRates = field(default_factory=MeasuredRates)
    # Seconds of host work a speculating step adds to its device time (it is taken in
    # before the next step is planned, so its host work does not overlap the device's),
    # by batch size in powers of two: its wall time less its device time.
    sync_host: dict[int, float] = field(default_factory=dict)
    # Seconds of the host's work per scheduled sequence in a step (None until
    # measured): a speculating step's host work until those at its batch size are.
    host_per_seq: float | None = None
    _kept: int = 0  # this step's kept drafts, and drafts judged (the first refused too)
    _judged: int = 0
    _verified: int = 0

    def record(self, drafted: int, accepted: int) -> None:
        """A verification: `accepted` of `drafted` draft tokens kept."""
        self.verifications += 1
        self._verified += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self._kept += accepted
        self._judged += accepted + (accepted < drafted)

    def step_done(self, tokens: int, device_s: float | None, decode_only: bool) -> None:
        """A step's verifications are all in: fold them into the recent acceptance, and
        a decode step's time into the measured cost."""
        if self._judged:
            self.recent_acceptance += _weight(self._verified) * (
                self._kept / self._judged - self.recent_acceptance)
        self._kept = self._judged = self._verified = 0
        if decode_only and device_s:
            self.measured.observe(tokens, device_s)

    def observe_sync_host(self, decodes: int, seconds: float) -> None:
        bucket = decodes.bit_length()
        self.sync_host[bucket] = _follow(self.sync_host.get(bucket), seconds)

    def observe_host(self, sequences: int, seconds: float) -> None:
        self.host_per_seq = _follow(self.host_per_seq, seconds / sequences)

    def scheduled(self, decodes: int, known: int, drafting: int, speculating: bool) -> None:
        """A step planned with `decodes` sequences decoding, `known` of them with their
        newest token known (the others cannot draft), `drafting` with drafts."""
        if not decodes:
            return
        self.decode_steps += 1
        if speculating:
            self.speculating_steps += 1
            if known:
                self.recent_coverage += _weight(known) * (drafting / known
                                                          - self.recent_coverage)

    def as_dict(self) -> dict[str, float]:
        """`acceptance_rate`: kept over proposed; `mean_accepted_length`: tokens a
        verification gives, the sampled one included."""
        return {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "acceptance_rate": self.accepted_tokens / self.draft_tokens
                if self.draft_tokens else 0.0,
                "mean_accepted_length": 1 + self.accepted_tokens / self.verifications
                if self.verifications else 0.0,
                "decode_steps": self.decode_steps, "speculating_steps": self.speculating_steps}


@dataclass(frozen=True)
class SpeculationPolicy:
    """Each step's draft length (the module's docstring)."""

    proposer: Proposer
    disable_by_batch_size: int | None = None
    cost: StepCost | None = None  # None: measured (MeasuredCost)
    # Seconds the first speculating step after plain ones adds, for `sequences` at a mean
    # `context` (a draft model's pass over what it sat out), where a model says: it
    # spaces a batch size's first probe. Then the switches measured do.
    switch_cost: Callable[[int, int], float] | None = None
    probe_every: int = 32
    probe_len: int = 4
    probe_share: float = 0.02

    def num_drafts(self, decodes: int, context: int, stats: SpecStats) -> int:
        """Draft tokens per sequence for a step with `decodes` sequences decoding at a
        mean `context`: 0 decodes it plainly."""
        k = self.proposer.k
        if self.disable_by_batch_size is not None and decodes > self.disable_by_batch_size:
            return 0
        best = modelled = self.best_length(decodes, context, stats) if decodes else k
        # Where both ways are measured at this batch size, the faster one goes (the models
        # miss some of the host's work); the model still picks how far to speculate.
        faster = stats.rates.speculating_is_faster(decodes)
        if faster is not None:
            best = (best or self.best_length(decodes, context, stats, at_least=1)) if faster else 0
        # Now and then probe_len steps go the other way, so both ways stay measured (in
        # runs: a way's first step after a switch is not measured). The wait starts at
        # probe_every steps and doubles, to 16 times that, while probes change nothing;
        # and it is long enough for the probes to cost at most probe_share of the time.
        if decodes.bit_length() != stats.probe_bucket:
            stats.probe_bucket = decodes.bit_length()
            if faster is None:  # a batch size not measured yet: probe soon
                stats.probe_wait = 0
                stats.steps_one_way = min(stats.steps_one_way, self.probe_every)
                stats.probing_after = None
        stats.steps_one_way += 1
        wait = stats.probing_after  # a probe under way keeps the wait it began after
        if wait is None:
            wait = max(stats.probe_wait or self.probe_every,
                       stats.rates.affordable_wait(decodes, self.probe_len, self.probe_share))
            if faster is None and not modelled:
                wait = max(wait, self.modelled_wait(decodes, context, stats))
            if stats.steps_one_way > wait:  # a probe begins (or, agreed below, is let go)
                stats.probing_after = wait = stats.steps_one_way - 1
                stats.probing_from = bool(best)
        # No probe into speculating where the model and the measured steps agree that
        # plain is faster: it would only cost (acceptance measured at other batch sizes
        # still moves the model).
        agreed = not best and not modelled and faster is not None
        if stats.steps_one_way > wait:
            if stats.steps_one_way <= wait + self.probe_len and not agreed:
                return 0 if best else k
            stats.steps_one_way = 0
            stats.probing_after = None
            stats.probe_wait = (min(2 * wait, 16 * self.probe_every)
                                if stats.probing_from == bool(best) else self.probe_every)
        return best

    def modelled_wait(self, decodes: int, context: int, stats: SpecStats) -> int:
        """Steps before a probe into speculating at a batch size not measured yet, where
        the model says plain: long enough for it to cost at most probe_share of the time
        at the modelled rates (MeasuredRates.affordable_wait, before there are any)."""
        plain = (self.cost or stats.measured)(decodes, 0, context)
        if plain is None:
            return 0
        speculating = self._best(decodes, context, stats, at_least=1)[1]
        switch_s = 0.0 if self.switch_cost is None else self.switch_cost(decodes, context)
        return _probe_wait(self.probe_len, self.probe_share, plain,
                           min(1.0, speculating * plain / decodes), switch_s)

    def best_length(self, decodes: int, context: int, stats: SpecStats,
                    at_least: int = 0) -> int:
        """The draft length of the highest expected token rate, `at_least` long (k where
        the cost is not known yet)."""
        return self._best(decodes, context, stats, at_least)[0]

    def _best(self, decodes: int, context: int, stats: SpecStats,
              at_least: int) -> tuple[int, float]:
        """best_length, and its tokens per second (0 where the cost is not known)."""
        k, cost = self.proposer.k, self.cost or stats.measured
        plain = cost(decodes, 0, context)
        if plain is None:
            return k, 0.0
        a, f = stats.recent_acceptance, stats.recent_coverage
        host = stats.sync_host.get(decodes.bit_length(),
                                   (stats.host_per_seq or 0.0) * decodes)
        best, best_rate, kept = 0, 0.0 if at_least else decodes / plain, 0.0
        for length in range(1, k + 1):
            kept += a ** length
            seconds = cost(decodes, round(f * decodes * length), context)
            assert seconds is not None
            rate = decodes * (1 + f * kept) / (seconds + host)
            if rate > best_rate:
                best, best_rate = length, rate
        return best, best_rate


def count_drafts(step: StepInput) -> tuple[int, int, int]:
    """(sequences sampling, those whose newest token is known, those with drafts) of a
    planned step. A sequence whose newest token is still in flight (planned while the
    step before ran) can have none: it does not count against the proposer."""
    decodes = known = drafting = 0
    for seq in step.seqs:
        if seq.do_sample:
            decodes += 1
            known += not seq.last_token_in_flight
            drafting += bool(seq.draft_token_ids)
    return decodes, known, drafting


def take_speculated(seq: Sequence, sample: Sample, scheduled: ScheduledSequence,
                    manager: BlockManager, stats: SpecStats,
                    stops: Callable[[Sequence], bool]) -> bool:
    """Append the draft tokens the target kept, and give back the slots of the refused
    ones and of the draft model's lookahead. `stops(seq)` finishes the sequence if
    its newest token ends it (and says so). False when it stopped on a kept draft
    token: the sampled one after it is dropped."""
    drafted = len(scheduled.draft_token_ids or ())
    kept = sample.accepted or []
    if drafted:
        stats.record(drafted, len(kept))
    # Preempted by recompute while the step ran, it holds no slots and computes again.
    if manager.has(seq.seq_id) or manager.is_swapped(seq.seq_id):
        seq.num_computed_tokens -= drafted - len(kept)
        if manager.num_slots(seq.seq_id) > seq.num_computed_tokens:
            manager.trim_slots(seq.seq_id, seq.num_computed_tokens)
        if scheduled.num_proposals:  # the draft model computed what the target kept
            seq.draft_computed = seq.num_computed_tokens
    for token, logprob in kept:
        seq.append_token(token, logprob, None)
        if stops(seq):
            return False
    return True
