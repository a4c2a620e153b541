"""The `pagedserve` command line (also `python -m pagedserve`).

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve",
                                     description="PagedAttention LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
