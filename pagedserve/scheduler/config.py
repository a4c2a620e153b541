"""The scheduler's limits, resolved once at engine build."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.scheduler.ngram import PromptLookup
from pagedserve.scheduler.proposers import ModelDrafts
from pagedserve.scheduler.speculation import SpeculationPolicy


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits, resolved: engine settings plus what the model and
    the device decide (`from_engine` builds it; tests build it directly)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: frozenset[int] = frozenset()
    # auto: recompute a request with one sequence, swap one with several (samples,
    # beams), whose shared blocks recomputation would duplicate. Without CPU room
    # for a swap, the request is recomputed.
    preemption_mode: str = EngineConfig.model_fields["preemption_mode"].default
    # The engine fills a step's structured-output masks after sending it, once the
    # step before is in (in-process workers only): constrained sequences plan ahead.
    late_masks: bool = False
    # Speculative decoding (engine.speculative): its proposer and when it runs; None:
    # every step decodes plainly. The engine gives it the device's step-time model.
    speculation: SpeculationPolicy | None = None

    @classmethod
    def from_engine(cls, engine: EngineConfig, *, max_model_len: int,
                    eos_token_ids: frozenset[int], device_type: str) -> SchedulerConfig:
        spec = engine.speculative
        return cls(max_num_seqs=engine.max_num_seqs,
                   max_num_batched_tokens=engine.step_token_budget(device_type),
                   max_model_len=max_model_len, eos_token_ids=eos_token_ids,
                   preemption_mode=engine.preemption_mode,
                   speculation=None if spec is None else SpeculationPolicy(
                       PromptLookup(spec.num_speculative_tokens, *spec.lookup)
                       if spec.runs == "ngram" else ModelDrafts(spec.num_speculative_tokens),
                       spec.disable_by_batch_size))
