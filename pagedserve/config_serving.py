"""The config sections of the serving plane: the endpoint, and how its replicas scale.

config.py composes them with the engine's sections into one `Config`; this
module holds them apart only because they are a concept of their own.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedserve.config_errors import DISCRIMINATOR


class StrictSection(BaseModel):
    """Every config section: unknown keys refused, values frozen once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingConfig(StrictSection):
    """The OpenAI-compatible endpoint (HTTP, and gRPC when grpc_port is set)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    # The ingress replica answers `port` itself (Ray Serve's direct ingress), so a
    # request skips the proxy's hop, which costs more CPU per streamed token than
    # anything else in the serving plane (BENCHMARKS.md). Serve's proxy still
    # runs, on `proxy_port` (default: port + 1). Off: the proxy answers `port`.
    # It is set when `pagedserve serve` starts Ray; a cluster joined through
    # RAY_ADDRESS keeps the setting its nodes were started with.
    direct_ingress: bool = True
    proxy_port: int | None = Field(default=None, ge=1, le=65535)
    # Ingress processes (OpenAIIngress replicas): each streams its requests on
    # an event loop of its own, and one cannot carry a node of GPUs at their
    # token rate. Above 1, Serve's HAProxy (bundled with ray[serve]) answers
    # `port` and spreads connections over them, each listening on a port of its
    # own among the 2 x ingress_replicas after the proxy's (half of them spare,
    # for replacements); Serve's proxy stays on the proxy's port.
    # `auto`: one per LLMServer replica (autoscaling.max_replicas). Needs
    # direct_ingress; gRPC (grpc_port) is served with one ingress process only.
    ingress_replicas: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    # Clients must send `Authorization: Bearer <api_key>` when set.
    api_key: str | None = Field(default=None, min_length=1)
    # The name clients pass as `model`; defaults to model.path or the random model's name.
    served_model_name: str | None = Field(default=None, min_length=1)
    max_request_bytes: int = Field(default=4 * 2**20, gt=0)
    # Stop strings per request: OpenAI allows 4, vLLM has no limit, lm-eval sends 5 and more.
    max_stop_sequences: int = Field(default=64, ge=1)
    # Requests beyond this many waiting in a replica's queue get 503 + Retry-After.
    max_waiting_requests: int = Field(default=1024, gt=0)
    # How tool calls are read out of the model's text when tool_choice is "auto"
    # (cluster/tool_parsers.py): hermes (Qwen2.5, Qwen3, SmolLM2, most fine-tunes),
    # llama3_json (Llama 3.1+) or mistral. None refuses "auto" with a 400.
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = "hermes"
    retry_after_s: int = Field(default=1, ge=0)
    # A streamed request's updates are at least this far apart; the steps in
    # between arrive together (fewer, larger chunks: less per-token overhead).
    stream_interval_s: float = Field(default=0.0, ge=0.0, le=1.0)
    # How the ingress picks an LLMServer replica: Serve's default (the shorter
    # queue of two random replicas), or prefix_aware (cluster/routing.py): the
    # replica that caches the most of the prompt's leading blocks.
    request_router: Literal["default", "prefix_aware"] = "default"
    # prefix_aware: take the least loaded replica instead once the best match
    # holds this many more in-flight requests than it.
    router_imbalance_threshold: int = Field(default=8, ge=1)
    # How often replicas report what they cache (prefix_aware).
    routing_stats_period_s: float = Field(default=2.0, gt=0.0)
    # Requests that wait in front of the replicas (in Serve's routers) when all
    # of them are at max_ongoing_requests; beyond this many they get a 503.
    max_queued_requests: int = Field(default=1024, gt=0)
    # Serve asks each replica this often whether its engine still runs; three
    # failed checks in a row (a dead worker, a stopped step loop) replace it.
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    health_check_timeout_s: float = Field(default=30.0, gt=0.0)
    # Log each request's prompt and sampling parameters (off: only ids, sizes, status).
    log_requests: bool = False

    @model_validator(mode="after")
    def _ports_differ(self) -> ServingConfig:
        if self.direct_ingress and self.http_proxy_port in (self.port, self.grpc_port):
            raise ValueError(f"proxy_port={self.http_proxy_port}: Serve's proxy needs a port "
                             f"of its own beside port={self.port} and grpc_port={self.grpc_port}")
        if self.http_proxy_port > 65535:
            raise ValueError(f"proxy_port: port + 1 = {self.http_proxy_port} is not a port; "
                             "set proxy_port (at most 65535)")
        if self.ingress_replicas != 1 and not self.direct_ingress:
            raise ValueError(f"ingress_replicas={self.ingress_replicas!r} needs direct_ingress: "
                             "without it Serve's one proxy answers every request")
        if self.ingress_replicas != 1 and self.grpc_port is not None:
            raise ValueError(f"ingress_replicas={self.ingress_replicas!r} with grpc_port="
                             f"{self.grpc_port}: gRPC is served with one ingress process only; "
                             "set ingress_replicas to 1 or leave grpc_port unset")
        return self

    def ingress_count(self, model_replicas: int) -> int:
        """The ingress processes, `auto` being one per LLMServer replica."""
        return model_replicas if self.ingress_replicas == "auto" else self.ingress_replicas

    def ingress_ports(self, replicas: int) -> range:
        """The ports `replicas` ingress processes listen on behind HAProxy: twice as
        many as they are, after the proxy's. A stopped ingress replica's port stays
        taken for a minute by connections closing (TIME_WAIT), and Serve does not
        try a taken port again: its replacement takes a spare one. The range is
        checked here, where the fields are named."""
        ports = range(self.http_proxy_port + 1, self.http_proxy_port + 1 + 2 * replicas)
        if ports[-1] > 65535:
            raise ValueError(f"serving.ingress_replicas={replicas}: their ports {ports[0]}-"
                             f"{ports[-1]} (after serving.proxy_port) end above 65535; lower "
                             "serving.proxy_port")
        if self.port in ports:
            raise ValueError(f"serving.port={self.port} is among the ports of the ingress "
                             f"replicas ({ports[0]}-{ports[-1]}, after serving.proxy_port="
                             f"{self.http_proxy_port}); set serving.proxy_port below "
                             "serving.port or past them")
        return ports

    @property
    def http_proxy_port(self) -> int:
        """Where Serve's HTTP proxy listens: `port` unless the ingress answers it directly."""
        if not self.direct_ingress:
            return self.port
        return self.proxy_port if self.proxy_port is not None else self.port + 1


class _Policy(StrictSection):
    upscale_delay_s: float = Field(default=30.0, ge=0.0)
    downscale_delay_s: float = Field(default=300.0, ge=0.0)


class KVUtilizationPolicy(_Policy):
    """Up when block utilization and the waiting queue are high, down when utilization is low."""

    name: Literal["kv_utilization"]
    target_utilization: float = Field(default=0.8, gt=0.0, le=1.0)
    queue_threshold: int = Field(default=0, ge=0)
    scale_down_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)


class KVCapacityPolicy(_Policy):
    """As many replicas as the blocks demanded by running + waiting requests need."""

    name: Literal["kv_capacity"]
    target_utilization: float = Field(default=0.8, gt=0.0, le=1.0)


class AutoscalingConfig(StrictSection):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    policy: KVUtilizationPolicy | KVCapacityPolicy = Field(
        default_factory=lambda: KVUtilizationPolicy(name="kv_utilization"),
        discriminator=DISCRIMINATOR)
    # How often each replica sends its stats to Serve's controller, and the
    # window the controller averages them over (Serve's fields of those names).
    metrics_interval_s: float = Field(default=10.0, gt=0.0)
    look_back_period_s: float = Field(default=30.0, gt=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds "
                             f"max_replicas={self.max_replicas}")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s={self.look_back_period_s} must exceed "
                             f"metrics_interval_s={self.metrics_interval_s}: the window "
                             "must hold at least one report")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas={initial} is outside "
                             f"[min_replicas={self.min_replicas}, "
                             f"max_replicas={self.max_replicas}]")
        return self
