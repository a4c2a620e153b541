"""The Ray Serve application: an OpenAI ingress in front of LLMServer replicas.

    pagedserve serve [CONFIG]                                   # the CLI
    serve run pagedserve.cluster.app:build_app config=configs/tiny-cpu.yaml
    serve run pagedserve.cluster.app:build_app                  # the embedded default

An LLMServer replica is the scheduler: it owns the block manager and streams
outputs, while the model runs in worker actors, one per tensor-parallel rank
(at tensor_parallel_size 1 too, unless the config asks for the in-process
`local` executor). Keeping the forward pass out of the replica's process keeps
it off the GIL that Serve's per-token streaming holds (BENCHMARKS.md, "Serving
through the OpenAI API vs offline generation", has the figures). The replica is
gang-placed with its workers: its placement group holds the replica's own
bundle first, then one bundle per rank (RayExecutor takes those), so a replica
starts only where all of its GPUs fit.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig, gRPCOptions

from pagedserve.cluster import autoscaling
from pagedserve.cluster.ingress import OpenAIIngress
from pagedserve.cluster.routing import PrefixAwareRouter
from pagedserve.cluster.server import LLMServer
from pagedserve.config import DEFAULT_CONFIG, Config, load

ROUTER_PATH = f"{PrefixAwareRouter.__module__}:{PrefixAwareRouter.__name__}"
POLICY_PATHS = {name: f"{policy.__module__}:{policy.__name__}"
                for name, policy in autoscaling.POLICIES.items()}
# Serve's gRPC proxy adds this servicer; it calls the ingress's Generate/GenerateStream.
GRPC_SERVICER_FUNCTIONS = (
    "pagedserve.cluster.proto.pagedserve_pb2_grpc.add_GenerationServicer_to_server",)


# Ray Serve's throughput-optimized mode: handle calls pass results by value,
# not through the object store, user code and the router run on each replica's
# own event loop, and Serve's logs go to files only (the Ray session's
# logs/serve/, which `pagedserve serve` names), not through stderr. With direct ingress
# the ingress replica answers HTTP itself, so streamed chunks skip the proxy's
# hop (BENCHMARKS.md, serving). An ingress replica that stops is held open for
# a draining period, and its port kept from the next one for a quarantine, both
# for load balancers to notice: 1 s and none here, not Serve's 30 s and 150 s,
# so a replaced ingress replica takes the configured port again at once.
# Serve reads these when its processes start, so they must be in the
# environment of the process that starts Ray (or of a cluster's nodes).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
             "RAY_SERVE_PORT_QUARANTINE_S": "0",
             # A request's call and its first output cross in one gRPC message each
             # (cluster/intake.py): as large as Serve's other gRPC messages may be, not
             # 4 MiB (a first output with prompt_logprobs of a long prompt is larger).
             "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}


# A stopping replica looks for requests still in flight every half second, not
# every 2 s (Serve's default), so a scale-down or a redeploy frees its CPUs
# sooner. Nothing is cut short: a request routed to it while it drains is still
# served, and one that arrives after is refused and sent to another replica.
SHUTDOWN_WAIT_LOOP_S = 0.5


def serve_env(config: Config | None = None) -> dict[str, str]:
    """The environment Serve's processes need: SERVE_ENV, and with a config its
    `serving.direct_ingress`: on, the ingress replica takes `serving.port`, or with
    several (`serving.ingress_replicas`) Serve's HAProxy does and they take the
    ports after the proxy's; off, the proxy takes `serving.port`."""
    env = dict(SERVE_ENV)
    if config is None:
        return env
    serving = config.serving
    if not serving.direct_ingress:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
        return env
    ports = range(serving.port, serving.port + 1)
    if config.ingress_replicas > 1:
        ports = serving.ingress_ports(config.ingress_replicas)
        # HAProxy answers http_options' port (`serving.port`, see http_options); Serve's
        # proxy, a fallback behind it, keeps the proxy's port.
        env |= {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(serving.http_proxy_port)}
    # The range is [min, max).
    return env | {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports.start),
                  "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports.stop)}


def serve_environment(config: Config | None = None) -> None:
    """Put serve_env(config) in this process's environment (a value already set wins)."""
    for name, value in serve_env(config).items():
        os.environ.setdefault(name, value)


def http_options(config: Config) -> dict[str, Any]:
    """Serve's HTTP proxy options (for `serve.start`): with several ingress replicas,
    HAProxy's, which answers `serving.port`."""
    serving = config.serving
    port = serving.port if config.ingress_replicas > 1 else serving.http_proxy_port
    return {"host": serving.host, "port": port}


def http_targets(app_name: str) -> list[tuple[str, int]]:
    """The (node address, port) pairs that answer an application's HTTP requests, as a
    load balancer would be told: its ingress replicas with direct ingress, else
    Serve's proxies. Each listens on the `host` given to `serve.start`."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return sorted((target.ip, target.port) for group in groups
                  if group.protocol == "HTTP" for target in group.targets)


def served(config: Config) -> Config:
    """The config a replica runs: the `auto` executor backend means worker actors."""
    if config.parallel.distributed_executor_backend != "auto":
        return config
    parallel = config.parallel.model_copy(update={"distributed_executor_backend": "ray"})
    return config.model_copy(update={"parallel": parallel})


def server_options(config: Config) -> dict[str, Any]:
    """Replicas, resources and placement of the LLMServer deployment."""
    parallel, scaling = config.parallel, config.autoscaling
    # A simulated GPU's workers only sleep: they take a sliver of a CPU, no GPU.
    on_gpu = config.engine.device == "cuda" and config.engine.simulator is None
    options: dict[str, Any] = {"graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
                               "health_check_period_s": config.serving.health_check_period_s,
                               "health_check_timeout_s": config.serving.health_check_timeout_s,
                               "max_ongoing_requests": max_ongoing_requests(config),
                               **backpressure(config)}
    if config.serving.request_router == "prefix_aware":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={
                "block_size": config.engine.block_size,
                "imbalance_threshold": config.serving.router_imbalance_threshold},
            request_routing_stats_period_s=config.serving.routing_stats_period_s)
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = autoscaling_config(config)
    if parallel.executor_backend == "ray":
        rank = {"GPU": 1} if on_gpu else {"CPU": parallel.worker_cpus}
        # The replica only schedules: a CPU on GPU nodes, a sliver on a CPU-only one.
        replica = {"CPU": 1} if on_gpu else {"CPU": 0.01}
        options["placement_group_bundles"] = [replica] + [rank] * parallel.tensor_parallel_size
        options["placement_group_strategy"] = parallel.placement_strategy
        options["ray_actor_options"] = {"num_cpus": replica["CPU"]}
    else:
        # The replica runs the model itself.
        options["ray_actor_options"] = ({"num_cpus": 1, "num_gpus": 1} if on_gpu
                                        else {"num_cpus": parallel.worker_cpus})
    return options


def autoscaling_config(config: Config) -> dict[str, Any]:
    """Serve's autoscaling_config: our policy class with the config's parameters.

    The policy applies its own delays (cluster/autoscaling.py), so Serve's are zero.
    """
    scaling = config.autoscaling
    kwargs = scaling.policy.model_dump(exclude={"name"})
    return {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas,
            "metrics_interval_s": scaling.metrics_interval_s,
            "look_back_period_s": scaling.look_back_period_s,
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "policy": {"policy_function": POLICY_PATHS[scaling.policy.name],
                       "policy_kwargs": kwargs}}


def max_ongoing_requests(config: Config) -> int:
    """Every request a replica may hold: running, waiting, and the ones about to be refused.

    Serve's default (a handful) would queue requests in front of the engine,
    where continuous batching cannot see them.
    """
    return config.engine.max_num_seqs + config.serving.max_waiting_requests + 1


def backpressure(config: Config) -> dict[str, Any]:
    """Serve's bound on requests waiting for a replica: beyond it, 503 + Retry-After."""
    return {"max_queued_requests": config.serving.max_queued_requests,
            "backpressure_config": BackpressureConfig(
                status_code=503, retry_after_s=config.serving.retry_after_s)}


def build(config: Config) -> Application:
    config = served(config)
    server = serve.deployment(LLMServer, name="LLMServer").options(**server_options(config))
    # Both deployments bound what waits in front of them (max_queued_requests), so a
    # flood of requests costs 503s, not memory (BENCHMARKS.md, reliability).
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress",
                               num_replicas=config.ingress_replicas,
                               ray_actor_options={"num_cpus": 0},
                               graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
                               max_ongoing_requests=max_ongoing_requests(config),
                               **backpressure(config))
    return ingress.bind(server.bind(config), config)


def build_app(args: dict[str, str]) -> Application:
    """Ray Serve's app-builder hook: `serve run pagedserve.cluster.app:build_app config=...`."""
    return build(load(args.get("config", DEFAULT_CONFIG)))


def grpc_options(config: Config) -> gRPCOptions | None:
    """Serve's gRPC proxy options (for `serve.start`); None when serving.grpc_port is unset."""
    if config.serving.grpc_port is None:
        return None
    return gRPCOptions(port=config.serving.grpc_port,
                       grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS))
