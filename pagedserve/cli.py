"""The `pagedserve` command line (also `python -m pagedserve`).

    pagedserve serve [configs/tiny-cpu.yaml] [--host H --port P --api-key K]
    pagedserve plan configs/llama-3-70b-tp4.yaml --gpu-memory-gb 80

Each subcommand is a function taking the parsed arguments, registered in
`build_parser`; a user error (a bad config, an unknown model) is one message on
stderr and exit status 2, as for a bad argument, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from pagedserve import config as config_module
from pagedserve.planner import DEFAULT_GPU_MEMORY_GB, format_plan, plan


def _plan(args: argparse.Namespace) -> None:
    result = plan(config_module.load(args.config), gpu_memory_gb=args.gpu_memory_gb,
                  mean_seq_len=args.mean_seq_len)
    print(json.dumps(asdict(result), indent=2) if args.json else format_plan(result))


def _serve(args: argparse.Namespace) -> None:
    """Start (or join) Ray, run the app until Ctrl-C, then shut it down."""
    import signal
    import time

    import ray
    from ray import serve

    from pagedserve.cluster.app import DEFAULT_CONFIG, build, grpc_options, serve_environment
    
    config = config_module.load(args.config or DEFAULT_CONFIG)
    overrides = {key: value for key, value in
                 (("host", args.host), ("port", args.port), ("api_key", args.api_key))
                 if value is not None}
    if overrides:
        data = config.model_dump()
        data["serving"].update(overrides)
        config = config_module.parse(data, "command-line options")
    serving = config.serving
    # Ctrl-C and `kill` both stop the server cleanly (even where SIGINT arrived ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve_environment()  # for the local cluster ray.init starts (RAY_ADDRESS: that cluster's own)
    ray.init(logging_level="WARNING")  # RAY_ADDRESS joins a cluster; else a local one
    try:
        serve.start(http_options={"host": serving.host, "port": serving.port},
                    grpc_options=grpc_options(config))
        serve.run(build(config), name="pagedserve", route_prefix="/")
        # Serve's gRPC proxy has no host option: it listens on every interface.
        grpc_address = ("" if serving.grpc_port is None else
                        f" and gRPC at [::]:{serving.grpc_port} (application=pagedserve)")
        print(f"pagedserve: serving {config_module.served_model_name(config)!r} at "
              f"http://{serving.host}:{serving.port}/v1{grpc_address} (Ctrl-C stops)", flush=True)
        print("pagedserve: Ray Serve's logs are in /tmp/ray/session_latest/logs/serve/",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("pagedserve: shutting down", flush=True)
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the cleanup
            signal.signal(stop, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve",
                                     description="PagedAttention LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", help="an OpenAI-compatible server on Ray Serve",
        description="Serve a config's model behind the OpenAI API (HTTP). Without CONFIG: "
                    "configs/tiny-cpu.yaml, the built-in tiny model on CPU.")
    serve_parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    serve_parser.add_argument("--host", help="address to listen on (serving.host)")
    serve_parser.add_argument("--port", type=int, help="HTTP port (serving.port)")
    serve_parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` "
                                                "(serving.api_key)")
    serve_parser.set_defaults(run=_serve)

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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"pagedserve {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
