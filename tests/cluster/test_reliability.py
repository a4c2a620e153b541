"""Faults and overload on the local Serve cluster: nothing hangs, nothing is lost.

- A tensor-parallel worker killed mid-generation: the replica's in-flight
  requests end at once with a 503 (or an error event in a stream), Serve's
  health check replaces the replica, and new requests succeed.
- The LLMServer replica itself killed: the same.
- A flood of requests: beyond the bounded queues clients get 503 + Retry-After,
  the replica's memory does not grow with the flood, and every accepted
  request finishes whole.

Processes die by SIGKILL, as in a crash or an out-of-memory kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from conftest import direct_url
from support import REPO

from pagedserve.config import load, parse
from pagedserve.testing.load import flood

CONFIGS = REPO / "configs"
LONG = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 1800, "ignore_eos": True}


def _app(serve_instance, name: str, path: str = "direct", **sections):
    """Deploy an app; its address through `path`: the ingress replica itself, or the proxy."""
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"].update(worker_cpus=0.25)
    for section, values in sections.items():
        data[section].update(values)
    serve.run(build(parse(data)), name=name, route_prefix=f"/{name}")
    return _address(serve_instance, name, path)


def _address(serve_instance, name: str, path: str) -> str:
    base = direct_url(name) if path == "direct" else f"http://127.0.0.1:{serve_instance.http}"
    return f"{base}/{name}"


def _stats(url: str) -> dict:
    response = httpx.get(f"{url}/stats", timeout=30)
    response.raise_for_status()
    return response.json()


class _InFlight:
    """Two streamed requests and one plain one, long enough to still run at the kill."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.streamed = threading.Event()  # every stream has its first chunk
        self.events: list[list[dict]] = [[], []]
        self.plain: httpx.Response | None = None
        self.threads = [threading.Thread(target=self._stream, args=(i,), daemon=True)
                        for i in range(2)]
        self.threads.append(threading.Thread(target=self._plain, daemon=True))
        self._first = [threading.Event(), threading.Event()]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        for first in self._first:
            assert first.wait(timeout=120), "the streams never started"
        # The plain request too is running on the replica, not still on its way there
        # (where a replica killed now would only send it to the next one).
        deadline = time.monotonic() + 60
        while _stats(self.url)["num_running"] < 3:
            assert time.monotonic() < deadline, "the plain request never started"
            time.sleep(0.05)

    def _stream(self, index: int) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json={**LONG, "stream": True},
                          timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.events[index].append(json.loads(line[6:]))
                    self._first[index].set()

    def _plain(self) -> None:
        self.plain = httpx.post(f"{self.url}/v1/completions", json=LONG, timeout=120)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"


def _assert_failed_fast(flight: _InFlight, codes: set[str]) -> None:
    for events in flight.events:
        error = events[-1].get("error")
        assert error is not None and error["code"] in codes, events[-1]
        generated = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
        assert len(generated) < 1800 * 8  # it stopped mid-way, it did not run to the end
    assert flight.plain.status_code == 503, flight.plain.text
    assert flight.plain.json()["error"]["code"] in codes


def _serves_again(url: str, old_pid: int, timeout: float = 180) -> dict:
    """Poll until a new replica (another process) answers requests; its stats."""
    deadline = time.monotonic() + timeout
    refused = 0
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url}/v1/completions", timeout=30,
                                  json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4})
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            stats = _stats(url)
            if stats["pid"] != old_pid:
                assert response.json()["usage"]["completion_tokens"] == 4
                return stats
        else:
            # While the dead replica is being replaced: 503s, never a 500.
            assert response is None or response.status_code == 503, response.text
            refused += 1
        time.sleep(0.5)
    raise AssertionError(f"no new replica served within {timeout} s ({refused} refusals)")


@pytest.fixture(scope="module")
def faults(serve_instance):
    from ray import serve

    # Health checks every second: a dead engine is replaced within seconds.
    url = _app(serve_instance, "faults", serving={"health_check_period_s": 1.0,
                                                  "health_check_timeout_s": 10.0})
    yield url
    serve.delete("faults")


def test_killed_worker_fails_in_flight_requests_and_the_replica_is_replaced(faults):
    before = _stats(faults)
    worker = before["worker_pids"][0]
    assert worker != before["pid"]  # served replicas run the model in a worker actor
    flight = _InFlight(faults)
    flight.start()
    os.kill(worker, signal.SIGKILL)
    flight.join(timeout=60)
    _assert_failed_fast(flight, {"engine_dead"})
    after = _serves_again(faults, before["pid"])
    assert worker not in after["worker_pids"]
    assert after["free_blocks"] == after["total_blocks"]


def test_killed_replica_fails_in_flight_requests_and_is_replaced(faults):
    before = _stats(faults)
    flight = _InFlight(faults)
    flight.start()
    os.kill(before["pid"], signal.SIGKILL)
    flight.join(timeout=60)
    _assert_failed_fast(flight, {"replica_unavailable"})
    after = _serves_again(faults, before["pid"])
    assert after["free_blocks"] == after["total_blocks"]


def test_a_killed_inbox_fails_in_flight_requests_and_the_next_ones_are_served(faults):
    """The ingress's inbox (cluster/channel.py) dies: its requests end at once, their
    blocks are freed, and the next request gets a new inbox."""
    flight = _InFlight(faults)
    flight.start()
    inboxes = [p for p in psutil.process_iter(["cmdline"])
               if "ray::Inbox" in " ".join(p.info["cmdline"] or [])]
    assert inboxes, "no inbox process"
    for process in inboxes:
        process.kill()
    flight.join(timeout=60)
    _assert_failed_fast(flight, {"ingress_unavailable", "replica_unavailable"})
    deadline = time.monotonic() + 60
    while True:
        response = httpx.post(f"{faults}/v1/completions", timeout=30,
                              json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4,
                                    "stream": True})
        stats = _stats(faults)
        served = response.status_code == 200 and "[DONE]" in response.text
        if served and stats["num_running"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            break
        assert time.monotonic() < deadline, (response.status_code, response.text, stats)
        time.sleep(0.5)
    assert '"error"' not in response.text


@pytest.fixture(scope="module")
def flood_app(serve_instance):
    """One app for both ingress paths' floods."""
    from ray import serve

    _app(serve_instance, "flood", engine={"max_num_seqs": 4},
         serving={"max_waiting_requests": 8, "max_queued_requests": 8})
    yield
    serve.delete("flood")


@pytest.mark.parametrize("path", ["direct", "proxy"])
def test_flood_is_refused_beyond_the_bounded_queues_and_memory_stays_flat(serve_instance,
                                                                           flood_app, path):
    url = _address(serve_instance, "flood", path)
    prompt = "flood " * 450  # 1,800 tokens: a queue that grew would show in memory
    first = asyncio.run(flood(url, "tiny-llama", 100, prompt=prompt))
    after_first = _stats(url)["peak_rss_bytes"]
    second = asyncio.run(flood(url, "tiny-llama", 400, prompt=prompt))
    after_second = _stats(url)["peak_rss_bytes"]
    for responses in (first, second):
        statuses = {r.status_code for r in responses}
        others = [r.text for r in responses if r.status_code not in (200, 503)]
        assert statuses <= {200, 503}, others
        accepted = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert accepted and refused, statuses
        # Everything accepted finished whole; every refusal says when to retry.
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in accepted)
        assert all(r.headers.get("retry-after") for r in refused), refused[0].headers
    # Four times the flood, and the replica holds at most a bounded queue's worth more.
    assert after_second - after_first < 64 * 2**20, (after_first, after_second)
    stats = _stats(url)
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["free_blocks"] == stats["total_blocks"]
