"""Steps to the ranks as changes, outputs back as tuples (worker/step_wire.py).

Every step of random scheduler workloads goes through the encoder and back in
tests/scheduler/test_scheduler_random.py."""

from __future__ import annotations

import dataclasses
import pickle

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import (
    PromptLogprobs,
    Sample,
    ScheduledSequence,
    StepInput,
    StepOutput,
)
from pagedserve.worker.step_wire import (
    StepDecoder,
    StepEncoder,
    pack_output,
    unpack_output,
)


def test_a_sequence_with_penalties_goes_whole_as_its_history_grows():
    """Penalties read the scheduler's live token list, which grows in place: a change
    tuple would leave the ranks with the history they were first sent."""
    params = SamplingParams(repetition_penalty=1.2)
    history = [5]

    def step(token: int, start: int) -> StepInput:
        return StepInput([ScheduledSequence(
            seq_id=1, token_ids=[token], start_pos=start, block_table=[0], do_sample=True,
            sampling_params=params, prompt_token_ids=[1, 2, 3], output_token_ids=history)])

    encoder, decoder = StepEncoder(), StepDecoder()
    decoder.decode(pickle.loads(pickle.dumps(encoder.encode(step(5, 3)))))
    history.append(6)
    second = decoder.decode(pickle.loads(pickle.dumps(encoder.encode(step(6, 4)))))
    assert second.seqs[0].output_token_ids == [5, 6]



def test_an_output_crosses_whole():
    """Every field of every Sample, set to something other than its default, survives
    the trip back; a field added to Sample and not to pack_output fails this."""
    full = Sample(seq_id=3, token_id=7, logprob=-0.5, top_logprobs={7: -0.5, 8: -1.0},
                  candidates=[(7, -0.5), (8, -1.0)], accepted=[(4, -0.1)], proposals=[9, 10])
    assert all(getattr(full, field.name) != field.default for field in dataclasses.fields(Sample))
    output = StepOutput([full, Sample(4, 5, -2.0)],
                        [PromptLogprobs(3, 1, [{1: -0.1, 2: -3.0}])], device_s=0.25)
    assert unpack_output(pickle.loads(pickle.dumps(pack_output(output)))) == output
    assert pack_output(None) is None and unpack_output(None) is None
