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
from pagedserve.model.roofline import StepShape
from pagedserve.scheduler.speculation import SpeculationPolicy
from pagedserve.worker.models.eagle import HEADS, TARGET_ARCHITECTURES, aux_layers
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
        return decode_time(sequences, drafts, _bucket(context))

    if info.draft is None:
        return dataclasses.replace(policy, cost=cost)
    draft = simulated_roofline(info.draft, engine, parallel.tensor_parallel_size)

    @functools.lru_cache(maxsize=4096)
    def catch_up(sequences: int, context: int) -> float:
        return draft.step_time([StepShape(context, context, 1)] * sequences)

    def switch_cost(sequences: int, context: int) -> float:
        """The draft's pass over every sequence's context: what it sat out, at most."""
        return catch_up(sequences, _bucket(context))

    return dataclasses.replace(policy, cost=cost, switch_cost=switch_cost)


def _bucket(context: int) -> int:
    return context // _CONTEXT_STEP * _CONTEXT_STEP + _CONTEXT_STEP // 2


def draft_model(config: Config, target: ModelInfo) -> ModelInfo | None:
    """The draft model engine.speculative names, resolved like the target on its device
    and in its dtype (on a simulated GPU, from its preset); None where the method
    needs none. A vocabulary unlike the target's is refused with the reason, and so is
    a target with a sliding window in every layer. Under tensor parallelism a draft is
    split like the target, so its heads must divide as the target's."""
    spec = config.engine.speculative
    if spec is None or spec.runs == "ngram":
        return None
    assert spec.model is not None  # SpeculativeConfig checks it
    if spec.runs in HEADS:
        return _eagle_head(config, target, spec.runs, spec.model)
    if target.shape.window_of_every_layer is not None:
        raise ValueError("engine.speculative: a draft model catches up over positions a "
                         "sliding window has released; a target with a window in every "
                         "layer runs 'ngram'")
    simulated = config.engine.simulator is not None
    try:  # split like the target: its heads must divide as the target's
        draft = resolve(ModelConfig(path=spec.model, max_model_len=target.max_model_len,
                                    trust_remote_code=config.model.trust_remote_code,
                                    # a preset has no tokenizer: the target's stands in
                                    tokenizer=config.model.tokenizer if simulated else None),
                        target.device, config.parallel, simulated=simulated)
    except ValueError as error:
        raise ValueError(f"engine.speculative.model: {error}") from None
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"engine.speculative.model: the draft {spec.model!r} has a vocabulary "
                         f"of {draft.vocab_size} tokens and the target {target.vocab_size}; a "
                         f"draft must share the target's tokenizer")
    return dataclasses.replace(draft, dtype=target.dtype)


def _eagle_head(config: Config, target: ModelInfo, method: str, path: str) -> ModelInfo:
    """An EAGLE head's checkpoint, checked against the target it reads."""
    where = "engine.speculative"
    if config.engine.simulator is not None:
        raise ValueError(f"{where}: the simulated GPU has no weights, so no hidden states for "
                         f"an EAGLE head to read; it runs 'ngram' and 'draft_model'")
    architectures = set(getattr(target.hf_config, "architectures", None) or ())
    if not architectures & TARGET_ARCHITECTURES:
        raise ValueError(f"{where}: an EAGLE head reads a Llama-family decoder's hidden "
                         f"states ({', '.join(sorted(TARGET_ARCHITECTURES))}); the target is "
                         f"{', '.join(sorted(architectures))}")
    # The head's own max_position_embeddings is what it was trained at, not a limit: its
    # rotary table spans the target's max_model_len (models/eagle.py).
    # Split like the target: its heads must divide as the target's.
    try:
        head = resolve(ModelConfig(path=path, trust_remote_code=config.model.trust_remote_code),
                       target.device, config.parallel)
    except ValueError as error:
        raise ValueError(f"{where}.model: {error}") from None
    hidden = getattr(head.hf_config, "target_hidden_size", None) or head.hf_config.hidden_size
    if hidden != target.hf_config.hidden_size:
        raise ValueError(f"{where}.model: the head {path!r} reads hidden states of "
                         f"{hidden} values and the target's have "
                         f"{target.hf_config.hidden_size}")
    if head.vocab_size != target.vocab_size:
        raise ValueError(f"{where}.model: the head {path!r} has a vocabulary of "
                         f"{head.vocab_size} tokens and the target {target.vocab_size}; a "
                         f"head must share the target's tokenizer")
    if method == "eagle3":
        layers = aux_layers(head.hf_config, target.shape.num_layers)
        if min(layers) < 0 or max(layers) >= target.shape.num_layers:
            raise ValueError(f"{where}.model: the head {path!r} reads the inputs of layers "
                             f"{list(layers)}, and the target has {target.shape.num_layers}")
    return dataclasses.replace(head, dtype=target.dtype, max_model_len=target.max_model_len,
                               draft_method=method)
