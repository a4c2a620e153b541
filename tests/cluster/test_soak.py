"""Soak: minutes of mixed client load on one replica (pagedserve.testing.load).

Nothing fails, nothing is lost, and nothing accumulates: afterwards the pool is
free, the queues are empty, and the replica's memory did not keep growing
from the first half of the run to the second.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support import REPO

from pagedserve.config import load, parse
from pagedserve.testing.load import mixed_load

CONFIGS = REPO / "configs"
HALF_S = 60.0  # two halves: 2 minutes of load


@pytest.mark.slow
def test_soak_mixed_load_loses_nothing_and_leaks_nothing(serve_instance):
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"].update(worker_cpus=0.5)
    data["engine"].update(max_num_seqs=16)
    serve.run(build(parse(data)), name="soak", route_prefix="/soak")
    url = f"http://127.0.0.1:{serve_instance.http}/soak"

    def stats() -> dict:
        return httpx.get(f"{url}/stats", timeout=30).json()

    first = asyncio.run(mixed_load(url, "tiny-llama", clients=24, duration_s=HALF_S, seed=1))
    rss_first = stats()["peak_rss_bytes"]
    second = asyncio.run(mixed_load(url, "tiny-llama", clients=24, duration_s=HALF_S, seed=2))
    end = stats()
    serve.delete("soak")

    for report in (first, second):
        summary = report.summary()
        assert summary["errored"] == summary["lost"] == 0, summary
        assert summary["ok"] > 100 and summary["left"] > 10, summary
        assert set(report.kinds) == {"plain", "stream", "chat", "n2", "leave"}
    assert end["num_running"] == end["num_waiting"] == end["num_swapped"] == 0
    assert end["free_blocks"] == end["total_blocks"], end
    # The second half ran as much load again; the replica's high-water mark barely moved.
    assert end["peak_rss_bytes"] - rss_first < 32 * 2**20, (rss_first, end["peak_rss_bytes"])
