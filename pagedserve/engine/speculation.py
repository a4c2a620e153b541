"""Speculative decoding at engine build: the draft model, checked against the
target, and the speculation policy's step-time model (scheduler/speculation.py).

On a simulated GPU the roofline that times its steps (model/roofline.py) also
says what a step with drafts costs against one without, so the policy finds
the best draft length from the GPU and the model, not from a constant. Other
devices measure their steps (speculation.MeasuredCost).
"""

from __future__ import annotations

import dataclasses
import functools

from pagedserve.config import Config, EngineConfig, ModelConfig, ParallelConfig
from pagedserve.model.info import ModelInfo
from pagedserve.model.resolve import resolve
from pagedserve.scheduler.speculation import SpeculationPolicy
from pagedserve.worker.simulated import simulated_roofline

# Mean contexts are taken in steps of this many positions, so step costs are reused.
_CONTEXT_STEP = 64


def speculation_policy(policy: SpeculationPolicy | None, info: ModelInfo,
                       engine: EngineConfig, parallel: ParallelConfig
                       ) -> SpeculationPolicy | None:
    """`policy` with the device's step-time model, where there is one."""
    if policy is None or engine.simulator is None:
        return policy
    roofline = simulated_roofline(info, engine, parallel.tensor_parallel_size)
    decode_time = functools.lru_cache(maxsize=4096)(roofline.decode_time)

    def cost(sequences: int, drafts: int, context: int) -> float:
        return decode_time(sequences, drafts, context // _CONTEXT_STEP * _CONTEXT_STEP
                           + _CONTEXT_STEP // 2)

    return dataclasses.replace(policy, cost=cost)


def draft_model(config: Config, target: ModelInfo) -> ModelInfo | None:
    """The draft model engine.speculative names, resolved like the target on its device
    and in its dtype (on a simulated GPU, from its preset); None where the method
    needs none. A vocabulary unlike the target's is refused with the reason, and so is
    a target with a sliding window in every layer. Under tensor parallelism rank 0
    holds the draft whole."""
    spec = config.engine.speculative
    if spec is None or spec.runs != "draft_model":
        return None
    assert spec.model is not None  # SpeculativeConfig checks it
    if target.shape.window_of_every_layer is not None:
        raise ValueError("engine.speculative: a draft model catches up over positions a "
                         "sliding window has released; a target with a window in every "
                         "layer runs 'ngram'")
    simulated = config.engine.simulator is not None
    draft = resolve(ModelConfig(path=spec.model, max_model_len=target.max_model_len,
                                trust_remote_code=config.model.trust_remote_code,
                                # a preset has no tokenizer: the target's stands in
                                tokenizer=config.model.tokenizer if simulated else None),
                    target.device, simulated=simulated)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"engine.speculative.model: the draft {spec.model!r} has a vocabulary "
                         f"of {draft.vocab_size} tokens and the target {target.vocab_size}; a "
                         f"draft must share the target's tokenizer")
    return dataclasses.replace(draft, dtype=target.dtype)
