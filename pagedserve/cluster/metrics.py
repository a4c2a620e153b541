"""The engine's state as Ray metrics: Ray's Prometheus endpoint and the Ray dashboard.

Names follow vLLM's (`vllm:num_requests_running` ...) with `pagedserve_` for
`vllm:`: Ray's metric pipeline drops names that contain a colon, and adds its
own `ray_` prefix, so Prometheus sees `ray_pagedserve_num_requests_running`.
Every series is tagged with the served model's name, the replica and the Ray node id
of the node it runs on (the dashboard's per-node view sums by it).

The engine's step thread calls `record_step` after each step (gauges, and counters by
their change since the last step); `LLMServer.generate` calls
`record_request` once a request finishes (latency histograms, token counts).
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

from pagedserve.engine.stats import EngineStats
from pagedserve.outputs import RequestOutput

PREFIX = "pagedserve_"
TAG_KEYS = ("model_name", "replica", "node_id")
# Seconds: from 1 ms to 10 min, like vLLM's latency buckets.
LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0]

GAUGES = {
    "kv_cache_usage_perc": "KV-cache usage: allocated blocks over all blocks (1 = full).",
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be admitted.",
    "num_requests_swapped": "Requests whose KV blocks are swapped out to CPU memory.",
}
# Counters the step thread advances from the engine's running totals.
STEP_COUNTERS = {
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache.",
    "num_preemptions_total": "Sequence groups preempted (recomputed or swapped out).",
}
# With speculative decoding (vLLM's names); exported once it has proposed.
SPEC_COUNTERS = {
    "spec_decode_num_draft_tokens_total": "Tokens speculative decoding proposed.",
    "spec_decode_num_accepted_tokens_total": "Proposed tokens the target model kept.",
}
# With LoRA enabled (engine stats' max_loras > 0).
LORA_COUNTERS = {
    "lora_loads_total": "LoRA adapters put into a device slot.",
    "lora_evictions_total": "LoRA adapters evicted from a device slot for another.",
}
# vLLM's lora_requests_info: the time, tagged with the adapters running and waiting
# (comma-separated names) and the number of device slots.
LORA_INFO_TAGS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")
REQUEST_COUNTERS = {
    "prompt_tokens_total": "Prompt tokens of finished requests.",
    "generation_tokens_total": "Tokens generated and returned by finished requests.",
}
HISTOGRAMS = {
    "time_to_first_token_seconds": "From arrival to the first generated token.",
    "time_per_output_token_seconds": "Mean time per output token after the first.",
    "e2e_request_latency_seconds": "From arrival to the last token.",
    "request_queue_time_seconds": "From arrival to first being scheduled.",
}


class EngineMetrics:
    def __init__(self, model_name: str, replica: str, node_id: str) -> None:
        tags = {"model_name": model_name, "replica": replica, "node_id": node_id}

        def make(kind, name: str, description: str, **options):
            return kind(PREFIX + name, description, tag_keys=TAG_KEYS,
                        **options).set_default_tags(tags)

        self.gauges = {name: make(Gauge, name, text) for name, text in GAUGES.items()}
        self.counters = {name: make(Counter, name, text) for name, text in
                         {**STEP_COUNTERS, **LORA_COUNTERS, **SPEC_COUNTERS,
                          **REQUEST_COUNTERS}.items()}
        self.histograms = {name: make(Histogram, name, text, boundaries=LATENCY_BUCKETS)
                           for name, text in HISTOGRAMS.items()}
        self._totals = dict.fromkeys([*STEP_COUNTERS, *LORA_COUNTERS, *SPEC_COUNTERS], 0)
        self.lora_info = Gauge(PREFIX + "lora_requests_info",
                               "Running and waiting requests per LoRA adapter.",
                               tag_keys=TAG_KEYS + LORA_INFO_TAGS).set_default_tags(tags)

    def record_step(self, stats: EngineStats) -> None:
        """After a step: the gauges' values, and the counters by their totals' change."""
        values = {"kv_cache_usage_perc": stats.utilization,
                  "num_requests_running": stats.num_running,
                  "num_requests_waiting": stats.num_waiting,
                  "num_requests_swapped": stats.num_swapped,
                  "prefix_cache_queries_total": stats.prefix_cache_queries,
                  "prefix_cache_hits_total": stats.prefix_cache_hits,
                  "num_preemptions_total": stats.num_preemptions,
                  "spec_decode_num_draft_tokens_total": stats.spec_decode_num_draft_tokens,
                  "spec_decode_num_accepted_tokens_total": stats.spec_decode_num_accepted_tokens,
                  "lora_loads_total": stats.lora_loads,
                  "lora_evictions_total": stats.lora_evictions}
        for name, gauge in self.gauges.items():
            gauge.set(values[name])
        counters = [*STEP_COUNTERS, *(LORA_COUNTERS if stats.max_loras else ()),
                    *(SPEC_COUNTERS if stats.spec_decode_num_draft_tokens else ())]
        for name in counters:
            change = values[name] - self._totals[name]
            if change > 0:
                self.counters[name].inc(change)
            self._totals[name] = values[name]
        if stats.max_loras:
            self.lora_info.set(time.time(), tags={
                "max_lora": str(stats.max_loras),
                "running_lora_adapters": ",".join(sorted(stats.lora_running)),
                "waiting_lora_adapters": ",".join(sorted(stats.lora_waiting))})

    def record_request(self, output: RequestOutput, prompt_tokens: int,
                       generated_by_choice: dict[int, int]) -> None:
        """A finished request (its last output, whose metrics hold its times): its token
        counts, per choice index, and latencies."""
        generated = sum(generated_by_choice.values())
        self.counters["prompt_tokens_total"].inc(prompt_tokens)
        if generated:
            self.counters["generation_tokens_total"].inc(generated)
        times = output.metrics
        if times is None or times.finished_time is None:
            return
        observe = {name: histogram.observe for name, histogram in self.histograms.items()}
        observe["e2e_request_latency_seconds"](times.finished_time - times.arrival_time)
        if times.first_scheduled_time is not None:
            observe["request_queue_time_seconds"](times.first_scheduled_time - times.arrival_time)
        if times.first_token_time is not None:
            observe["time_to_first_token_seconds"](times.first_token_time - times.arrival_time)
            tokens = max(generated_by_choice.values(), default=0)
            if tokens > 1:
                observe["time_per_output_token_seconds"](
                    (times.finished_time - times.first_token_time) / (tokens - 1))
