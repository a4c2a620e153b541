"""memory.py's two figures: KV slot utilization (paged against pre-allocation) and
the memory block sharing saves, drawn from its results. Run, it redraws them from a
saved `memory.json`:

    python benchmarks/memory_figures.py [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def plot_utilization(memory: dict, path: Path, waste_target: float) -> None:
    names = list(memory)
    fig = Figure(figsize=(8, 4.5))  # no pyplot: rendered by Agg, no GUI backend or global state
    ax = fig.subplots()
    for offset, system, color in ((-0.2, "paged", "tab:blue"), (0.2, "preallocation", "tab:gray")):
        xs = [i + offset for i in range(len(names))]
        used = [100 * memory[n][system]["utilization"] for n in names]
        ax.bar(xs, used, 0.38, color=color, label=f"{system}: used")
        ax.bar(xs, [100 - u for u in used], 0.38, bottom=used, color=color, alpha=0.25,
               hatch="//", label=f"{system}: wasted")
        for x, u in zip(xs, used, strict=True):
            ax.text(x, u - 6, f"{u:.1f}%", ha="center", color="white", fontsize=8)
    ax.axhline(100 * (1 - waste_target), color="black", ls="--", lw=1, label="target: waste <= 4%")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("% of allocated KV slots (mean over steps)")
    ax.set_ylim(0, 105)
    ax.set_title("KV slot utilization: paged vs pre-allocation to max length")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_sharing(shared: dict, path: Path, paper_saved: dict) -> None:
    widths = [int(w) for w in shared["parallel"]]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for method, color, label in (("parallel", "tab:green", "parallel sampling (n)"),
                                 ("beam", "tab:purple", "beam search (width)")):
        lo, hi = paper_saved[method]
        ax.axhspan(100 * lo, 100 * hi, color=color, alpha=0.12, label=f"paper: {label}")
        ax.plot(widths, [100 * shared[method][str(w)]["saved"] for w in widths], "o-",
                color=color, label=f"pagedserve: {label}")
    ax.set_xticks(widths)
    ax.set_xlabel("n / beam width")
    ax.set_ylabel("KV memory saved vs separate copies (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Block sharing (ShareGPT-like lengths, prefix caching off)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"),
                        help="where memory.py wrote memory.json; the figures go there too")
    args = parser.parse_args()
    report = json.loads((args.out_dir / "memory.json").read_text())
    plot_utilization(report["memory"], args.out_dir / "memory_utilization.png",
                     report["waste_target"])
    plot_sharing(report["sharing"], args.out_dir / "memory_sharing.png", report["paper_saved"])
    print(f"drew memory_utilization.png and memory_sharing.png in {args.out_dir}/")


if __name__ == "__main__":
    main()
