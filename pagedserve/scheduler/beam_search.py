"""Beam search as a per-step policy that reproduces Hugging Face transformers.

Why: the engine owns the sequences and their KV blocks (a beam that forks shares
its parent's blocks copy-on-write), so beam search splits in two. The engine runs
the model and hands over each live beam's best next tokens; this policy decides
which continuations survive and which finished hypotheses are kept. It mirrors
``GenerationMixin._beam_search`` of transformers 5.x step for step, so a request
returns what ``model.generate(num_beams=..., do_sample=False)`` returns:

* Each step keeps the ``max(2, 1 + len(eos)) * num_beams`` best candidates by
  cumulative log-probability, so at least ``num_beams`` of them do not end on EOS.
* A candidate that hits a stopping criterion (its token is an EOS, or it reaches
  ``max_new_tokens``) becomes a finished hypothesis only if it ranks among the first
  ``num_beams`` candidates; its score is ``cumulative / n ** length_penalty`` with
  ``n`` the generated length including the new token (HF's ``cur_len + 1 -
  prompt_len``). The ``num_beams`` best finished hypotheses are kept.
* The next live beams are the ``num_beams`` best candidates that did not stop.
  At ``max_new_tokens`` every candidate stops, so the live beams compete with the
  finished hypotheses through the top ``num_beams`` candidates of the last step.
* With ``num_beams`` finished hypotheses the search ends: at once when
  ``early_stopping is True``; otherwise when the best live beam, divided by
  ``n ** length_penalty`` for its current length ``n`` (for ``"never"`` with a
  positive penalty, for ``max_new_tokens``), can no longer beat the worst one.

HF starts from ``num_beams`` copies of the prompt scored ``[0, -1e9, ...]``, so its
first step only draws from the first copy; here the first step gets exactly one
live beam, which selects the same candidates. HF keeps scores in float32, and
rounding decides ties and stopping, so every sum and quotient is rounded to
float32 as torch rounds it. Exact ties (which ``torch.topk`` breaks arbitrarily)
go to the earlier beam, then to the engine's order of its tokens.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass


def _f32(x: float) -> float:
    """Round to the nearest float32: with float32 operands, one IEEE float32 op."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass
class Beam:
    """A live beam: its generated tokens (not the prompt) and its running score."""

    output_token_ids: list[int]
    cumulative_logprob: float


@dataclass
class Hypothesis:
    """A finished sequence, ranked by its length-penalised ``score``."""

    output_token_ids: list[int]
    score: float
    cumulative_logprob: float


class BeamSearch:
    """The beam-search decisions for one request; see the module docstring."""

    def __init__(self, *, num_beams: int, num_return_sequences: int, length_penalty: float,
                 early_stopping: bool | str, eos_token_ids: frozenset[int] | set[int],
                 max_new_tokens: int) -> None:
        _check(isinstance(num_beams, int) and num_beams >= 1, "num_beams", num_beams,
               "must be an int >= 1")
        _check(isinstance(num_return_sequences, int) and 1 <= num_return_sequences <= num_beams,
               "num_return_sequences", num_return_sequences,
               f"must be in [1, num_beams={num_beams}]")
        _check(math.isfinite(length_penalty), "length_penalty", length_penalty, "must be finite")
        _check(isinstance(early_stopping, bool) or early_stopping == "never", "early_stopping",
               early_stopping, "must be True, False or 'never'")
        _check(all(isinstance(t, int) and t >= 0 for t in eos_token_ids), "eos_token_ids",
               eos_token_ids, "must be token ids (ints >= 0)")
        _check(isinstance(max_new_tokens, int) and max_new_tokens >= 1, "max_new_tokens",
               max_new_tokens, "must be an int >= 1")
        self.num_beams = num_beams
        self.num_return_sequences = num_return_sequences
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self._num_generated = 0  # tokens in every live beam
        self._finished: list[Hypothesis] = []  # best first, at most num_beams
        self._done = False

    @property
    def candidates_per_beam(self) -> int:
        """How many of its best tokens each live beam must supply per step.

        This is HF's ``beams_to_keep``, the number of candidates kept per step. Taking
        them from the union of every beam's own best ``beams_to_keep`` is exact: a
        candidate in the global top k has fewer than k candidates above it overall,
        hence fewer than k above it within its own beam, so its beam supplied it.
        """
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams

    @property
    def done(self) -> bool:
        """Whether the search has ended (the last ``step`` returned ``[]``)."""
        return self._done

    def step(self, beams: list[Beam], top_tokens: list[list[tuple[int, float]]]
             ) -> list[tuple[int, int, float]]:
        """Advance one token: record finished hypotheses, return the next live beams.

        ``beams`` are the live beams (one on the first call, ``num_beams`` later) in
        the order the previous call returned them; ``top_tokens[b]`` holds beam b's
        ``candidates_per_beam`` best ``(token_id, logprob)``, best first. Returns the
        next live beams as ``(parent index into beams, token_id, cumulative
        logprob)``, best first, or ``[]`` once the search is done.
        """
        if self._done:
            raise RuntimeError("step() called after the beam search finished")
        expected = 1 if self._num_generated == 0 else self.num_beams
        _check(len(beams) == expected, "beams", f"<{len(beams)} beams>", f"must hold {expected}")
        _check(len(top_tokens) == len(beams), "top_tokens", f"<{len(top_tokens)} lists>",
               f"must hold one list per beam ({len(beams)})")
        k = self.candidates_per_beam
        for row in top_tokens:
            _check(len(row) == k, "top_tokens", f"<a list of {len(row)}>",
                   f"must hold candidates_per_beam={k} tokens per beam")

        # The k best continuations overall; sort() is stable, so ties keep beam order.
        candidates = [(_f32(beam.cumulative_logprob + logprob), parent, token)
                      for parent, (beam, row) in enumerate(zip(beams, top_tokens, strict=True))
                      for token, logprob in row]
        candidates.sort(key=lambda c: -c[0])
        del candidates[k:]

        self._num_generated += 1
        at_max_length = self._num_generated >= self.max_new_tokens
        penalty = _f32(self._num_generated ** self.length_penalty)
        running: list[tuple[int, int, float]] = []
        for rank, (score, parent, token) in enumerate(candidates):
            if at_max_length or token in self.eos_token_ids:
                if rank < self.num_beams:  # lower-ranked stops are dropped, as in HF
                    self._finished.append(Hypothesis(
                        beams[parent].output_token_ids + [token], _f32(score / penalty), score))
            elif len(running) < self.num_beams:
                running.append((parent, token, score))
        self._finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del self._finished[self.num_beams:]

        self._done = at_max_length or self._cannot_improve(running[0][2])
        return [] if self._done else running

    def _cannot_improve(self, best_running: float) -> bool:
        """HF's stopping test once ``num_beams`` hypotheses have finished."""
        if len(self._finished) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        length = self._num_generated
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        best_possible = _f32(best_running / _f32(length ** self.length_penalty))
        return not best_possible > self._finished[-1].score

    def finalize(self) -> list[Hypothesis]:
        """The ``num_return_sequences`` best hypotheses, best first, as HF returns them.

        HF adds no live beam at the end: at ``max_new_tokens`` the last step already
        turned the best candidates into hypotheses, so only finished ones count.
        """
        if not self._done:
            raise RuntimeError("finalize() called before the beam search finished")
        return self._finished[:self.num_return_sequences]


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"BeamSearch {name}={value!r}: {rule}")
