"""Steps to the ranks as what changed since the step before (vLLM's persistent batch),
and their outputs back as tuples.

A decode step at batch 256 holds 256 ScheduledSequences, each with its whole block
table, and every rank unpickles all of it before the step can start: with four
ranks on the cores of the engine's host, that was the device's wait at each step
(BENCHMARKS.md, "Keeping up with a GPU"). Between two steps, a decoding sequence
changes in a few fields only. So the driver's `StepEncoder` sends a sequence the
ranks held in the step before as a tuple of those fields and the blocks appended
to its table, and any other sequence whole; each rank's `StepDecoder` applies the
tuple to the sequence it holds and hands the worker an ordinary StepInput.

    driver: StepEncoder.encode(step) ──> EncodedStep ──> each rank: StepDecoder.decode

Both ends hold exactly the sequences of the last step sent: one that sits a step
out is sent whole when it comes back. A sequence is sent as a change only where
everything but the changing fields is as it was and its old table is the start of
its new one; anything else (a prompt chunk, penalties, min_tokens, speculation,
beams, prompt logprobs, a copy on write, a window's released blocks, a swap)
goes whole, so the rank's copy is always what the driver scheduled.

Rank 0's StepOutput comes back with each Sample as a tuple of its fields
(`pack_output`, `unpack_output`): Ray pickles a return value with cloudpickle,
which took a millisecond for 256 Samples as dataclasses, and rank 0 starts the
next step only once it has returned this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pagedserve.scheduler.step import Sample, ScheduledSequence, StepInput, StepOutput

# The fields a held sequence may change from one step to the next and still be sent
# as a change; `block_table` may grow. Every other field must be as it was.
_CHANGING = ("token_ids", "start_pos", "last_token_in_flight", "output_index", "bitmask_row",
             "next_token_id")
_STEADY = tuple(field.name for field in dataclasses.fields(ScheduledSequence)
                if field.name not in (*_CHANGING, "seq_id", "block_table"))


@dataclass(frozen=True)
class EncodedStep:
    """A step on its way to the ranks: its other fields, and per sequence in order
    either the whole ScheduledSequence or a change tuple
    (seq_id, *the _CHANGING fields, the blocks appended)."""

    step: StepInput  # with no sequences
    seqs: list[ScheduledSequence | tuple]


def _continues(held: ScheduledSequence, seq: ScheduledSequence) -> bool:
    """Whether `seq` is `held` one step on: its steady fields the same, its table grown.

    A sequence with penalties is not: its token history is the scheduler's live list,
    the same object from step to step while it grows."""
    if seq.output_token_ids is not None or seq.prompt_token_ids is not None:
        return False
    for name in _STEADY:
        old, new = getattr(held, name), getattr(seq, name)
        if old is not new and old != new:
            return False
    table, grown = held.block_table, seq.block_table
    return len(grown) >= len(table) and grown[:len(table)] == table


class StepEncoder:
    """The driver's end: what each step changes from the one sent before."""

    def __init__(self) -> None:
        self._held: dict[int, ScheduledSequence] = {}

    def encode(self, step: StepInput) -> EncodedStep:
        held, sent = self._held, {}
        seqs: list[ScheduledSequence | tuple] = []
        for seq in step.seqs:
            old = held.get(seq.seq_id)
            if old is not None and _continues(old, seq):
                seqs.append((seq.seq_id, seq.token_ids, seq.start_pos, seq.last_token_in_flight,
                             seq.output_index, seq.bitmask_row, seq.next_token_id,
                             seq.block_table[len(old.block_table):]))
            else:
                seqs.append(seq)
            sent[seq.seq_id] = seq
        self._held = sent
        return EncodedStep(dataclasses.replace(step, seqs=[]), seqs)


class StepDecoder:
    """A rank's end: the steps as the driver scheduled them, from their changes."""

    def __init__(self) -> None:
        self._held: dict[int, ScheduledSequence] = {}

    def decode(self, encoded: EncodedStep) -> StepInput:
        """The StepInput `encoded` stands for."""
        held, kept = self._held, {}
        seqs = []
        for entry in encoded.seqs:
            if type(entry) is tuple:
                (seq_id, token_ids, start_pos, in_flight, output_index, bitmask_row,
                 next_token_id, appended) = entry
                seq = held[seq_id]  # held since the last step: updated in place
                seq.token_ids, seq.start_pos, seq.last_token_in_flight = (
                    token_ids, start_pos, in_flight)
                seq.output_index, seq.bitmask_row, seq.next_token_id = (
                    output_index, bitmask_row, next_token_id)
                if appended:
                    seq.block_table.extend(appended)
            else:
                seq = entry
            kept[seq.seq_id] = seq
            seqs.append(seq)
        self._held = kept
        return dataclasses.replace(encoded.step, seqs=seqs)


@dataclass(frozen=True)
class PackedOutput:
    """A StepOutput on its way back from rank 0: each Sample as the tuple of its fields."""

    samples: list[tuple]
    prompt_logprobs: list
    device_s: float | None


def pack_output(output: StepOutput | Any) -> PackedOutput | Any:
    """Rank 0's output as it crosses to the driver; anything else (a rank's None, a
    failure) as it is."""
    if not isinstance(output, StepOutput):
        return output
    return PackedOutput([(s.seq_id, s.token_id, s.logprob, s.top_logprobs, s.candidates,
                          s.accepted, s.proposals) for s in output.samples],
                        output.prompt_logprobs, output.device_s)


def unpack_output(packed: PackedOutput | Any) -> StepOutput | Any:
    """The StepOutput `pack_output` packed (anything else as it is)."""
    if not isinstance(packed, PackedOutput):
        return packed
    return StepOutput([Sample(*fields) for fields in packed.samples], packed.prompt_logprobs,
                      packed.device_s)
