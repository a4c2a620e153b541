"""benchmarks/memory.py runs end to end (--quick) and its figures make sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    pytest.importorskip("matplotlib")  # in the dev extra; skipped only outside it
    out_dir = tmp_path_factory.mktemp("memory")
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(out_dir)],
                   check=True, capture_output=True, text=True, timeout=120)
    return json.loads((out_dir / "memory.json").read_text()), out_dir


def test_paged_uses_more_of_its_slots_than_preallocation(report):
    data, _ = report
    assert set(data["memory"]) == {"short-chat", "medium", "long-document", "mixed"}
    for row in data["memory"].values():
        assert row["paged"]["utilization"] > row["preallocation"]["utilization"]
        assert row["paged"]["max_concurrent_seqs"] >= row["preallocation"]["max_concurrent_seqs"]


def test_sharing_saves_blocks_for_every_width(report):
    data, _ = report
    for method in ("parallel", "beam"):
        assert set(data["sharing"][method]) == {"2", "4", "6"}
        for result in data["sharing"][method].values():
            assert result["saved"] > 0
            assert result["physical_blocks"] < result["logical_blocks"]


def test_plots_are_written(report):
    _, out_dir = report
    for name in ("memory_utilization.png", "memory_sharing.png"):
        assert (out_dir / name).stat().st_size > 0


def test_fp8_pool_has_twice_the_blocks_and_admits_more(report):
    data, _ = report
    pools = data["kv_cache_dtype"]["pools"]
    assert set(pools) == {"bfloat16", "fp8"}
    assert pools["fp8"]["blocks"] == 2 * pools["bfloat16"]["blocks"]
    assert pools["fp8"]["block_bytes"] * 2 == pools["bfloat16"]["block_bytes"]
    assert pools["fp8"]["mean_admitted_vs_bfloat16"] > 1.5
    assert pools["fp8"]["max_concurrent_seqs_vs_bfloat16"] > 1.5
    assert pools["bfloat16"]["blocks_vs_bfloat16"] == 1.0
