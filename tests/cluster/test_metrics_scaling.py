"""On the local Ray cluster: engine metrics reach Ray's Prometheus endpoint; the
prefix-aware router keeps a shared prefix on one replica and spreads distinct prompts
(read off the per-replica token counters); and the kv_utilization policy scales
LLMServer replicas 1 -> 2 under load and back to 1 idle, with no request failing.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import threading
import time

import httpx
import ray
from support import REPO

from pagedserve.cluster.metrics import (
    GAUGES,
    HISTOGRAMS,
    LORA_COUNTERS,
    REQUEST_COUNTERS,
    SPEC_COUNTERS,
    STEP_COUNTERS,
)
from pagedserve.config import load, parse

CONFIGS = REPO / "configs"


def _deploy(serve_instance, name: str, config_file: str = "tiny-cpu.yaml", **sections) -> str:
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / config_file).model_dump()
    data["parallel"]["worker_cpus"] = 0.25
    for section, values in sections.items():
        data[section].update(values)
    serve.run(build(parse(data)), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve_instance.http}/{name}"


def _samples(text: str, metric: str, model: str) -> list[float]:
    """Values of `ray_pagedserve_<metric>` series tagged with `model`."""
    pattern = re.compile(rf'^ray_pagedserve_{metric}\{{([^}}]*)\}} (\S+)$', re.M)
    return [float(value) for tags, value in pattern.findall(text)
            if f'model_name="{model}"' in tags]


def test_metrics_reach_rays_endpoint_and_count_the_tokens_served(serve_instance,
                                                                  ray_metrics_url):
    from ray import serve

    model = "metrics-llama"
    # A 32-block pool: four concurrent requests outgrow it, so some are preempted.
    url = _deploy(serve_instance, "metrics", serving={"served_model_name": model},
                  model={"max_model_len": 256},
                  engine={"kv_cache_memory_gb": 0.002, "max_num_seqs": 4})
    prompt = "A system prompt that every request of this test shares, " * 4
    usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def complete(max_tokens: int) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        for key in usage:
            usage[key] += answer["usage"][key]

    try:
        for max_tokens in (3, 5, 7):  # one after another: the 2nd and 3rd hit the cache
            complete(max_tokens)
        crowd = [threading.Thread(target=complete, args=(150,)) for _ in range(4)]
        for thread in crowd:
            thread.start()
        for thread in crowd:
            thread.join(timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # Ray exports every 0.5 s here
            text = httpx.get(ray_metrics_url, timeout=10).text
            if sum(_samples(text, "generation_tokens_total", model)) == usage["completion_tokens"]:
                break
            time.sleep(0.5)
    finally:
        serve.delete("metrics")
    for name in [*GAUGES, *STEP_COUNTERS, *REQUEST_COUNTERS]:
        assert _samples(text, name, model), f"ray_pagedserve_{name} is missing"
    for name in HISTOGRAMS:
        assert sum(_samples(text, f"{name}_count", model)) == 7, name
    assert sum(_samples(text, "generation_tokens_total", model)) == usage["completion_tokens"]
    assert sum(_samples(text, "prompt_tokens_total", model)) == usage["prompt_tokens"]
    assert sum(_samples(text, "num_preemptions_total", model)) >= 1
    # The shared prompt: later requests hit the blocks the 1st cached.
    hits = sum(_samples(text, "prefix_cache_hits_total", model))
    queries = sum(_samples(text, "prefix_cache_queries_total", model))
    assert 0 < hits < queries  # recomputed (preempted) prompts are looked up again
    assert all(0.0 <= value <= 1.0 for value in _samples(text, "kv_cache_usage_perc", model))
    ttft = sum(_samples(text, "time_to_first_token_seconds_sum", model))
    e2e = sum(_samples(text, "e2e_request_latency_seconds_sum", model))
    assert 0 < ttft < e2e
    # Every series names the Ray node its replica runs on.
    series = [line for line in text.splitlines()
              if line.startswith("ray_pagedserve_") and f'model_name="{model}"' in line]
    nodes = {re.search(r'node_id="([^"]*)"', line).group(1) for line in series}
    assert nodes and nodes <= {node["NodeID"] for node in ray.nodes()}, nodes


def _by_replica(text: str, metric: str, model: str) -> dict[str, float]:
    pattern = re.compile(rf'^ray_pagedserve_{metric}\{{([^}}]*)\}} (\S+)$', re.M)
    totals: dict[str, float] = {}
    for tags, value in pattern.findall(text):
        if f'model_name="{model}"' in tags:
            replica = re.search(r'replica="([^"]*)"', tags).group(1)
            totals[replica] = totals.get(replica, 0.0) + float(value)
    return totals


def _exported(url: str, metric: str, model: str, total: float) -> dict[str, float]:
    """Per replica, once the replicas' sum of `metric` reaches `total` (Ray exports late)."""
    deadline = time.monotonic() + 60
    while True:
        counts = _by_replica(httpx.get(url, timeout=10).text, metric, model)
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def test_prefix_aware_router_keeps_a_shared_prefix_on_one_replica(serve_instance,
                                                                  ray_metrics_url):
    from ray import serve

    model = "routed-llama"
    url = _deploy(serve_instance, "routed", serving={
        "served_model_name": model, "request_router": "prefix_aware",
        "routing_stats_period_s": 0.5}, autoscaling={"min_replicas": 2, "max_replicas": 2})
    rng = random.Random(0)
    system = [rng.randrange(6, 500) for _ in range(80)]  # 5 full blocks

    def complete(prompt: list[int]) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": 2}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens"]

    try:
        shared = sum(complete(system + [rng.randrange(6, 500) for _ in range(8)])
                     for _ in range(6))
        counts = _exported(ray_metrics_url, "prompt_tokens_total", model, shared)
        assert max(counts.values()) == shared, counts  # all six on one replica
        distinct = [[rng.randrange(6, 500) for _ in range(40)] for _ in range(12)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            spread = sum(pool.map(complete, distinct))
        after = _exported(ray_metrics_url, "prompt_tokens_total", model, shared + spread)
    finally:
        serve.delete("routed")
    assert sum(after.values()) == shared + spread
    assert len(after) == 2 and min(after.values()) > 0, after  # distinct prompts spread


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


def test_kv_utilization_scales_up_under_load_and_down_when_idle(serve_instance):
    from ray import serve

    # The shipped config: 1-2 replicas with 64-block pools, kv_utilization at 0.5.
    url = _deploy(serve_instance, "scaling", "tiny-cpu-autoscale.yaml")
    body = {"model": "tiny-llama", "prompt": "Scale me " * 30, "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    failures: list[str] = []
    done: list[int] = []

    def request() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body,
                              timeout=300) as response:
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.read()!r}")
                    return
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            if lines[-1] != "data: [DONE]":
                failures.append(f"stream ended without [DONE]: {lines[-1]!r}")
            done.append(1)
        except httpx.HTTPError as error:
            failures.append(repr(error))

    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            request()

    try:
        assert _replicas("scaling") == 1
        # 12 clients keep the 64-block pool full (and requests waiting) until it scales.
        clients = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 180
        while _replicas("scaling") < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        scaled_up = _replicas("scaling")
        time.sleep(2)  # both replicas serve for a while
        stop.set()
        for thread in clients:
            thread.join(timeout=300)
        assert scaled_up == 2, "no scale-up under a full KV pool"
        assert not failures and done, failures
        deadline = time.monotonic() + 120
        while _replicas("scaling") > 1 and time.monotonic() < deadline:
            request()  # a light trickle: requests keep succeeding while it scales down
            time.sleep(0.5)
        assert _replicas("scaling") == 1, "no scale-down when idle"
        assert not failures, failures
    finally:
        serve.delete("scaling")


def _dashboard() -> dict:
    import json

    return json.loads((CONFIGS.parent / "dashboards" / "grafana-pagedserve.json").read_text())


def test_grafana_dashboard_plots_every_metric():
    panels = _dashboard()["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for name in [*GAUGES, *STEP_COUNTERS, *LORA_COUNTERS, *SPEC_COUNTERS, *REQUEST_COUNTERS,
                 *HISTOGRAMS, "lora_requests_info"]:
        assert f"ray_pagedserve_{name}" in exprs, name


def test_grafana_dashboard_has_a_per_node_view():
    dashboard = _dashboard()
    assert "node_id" in {variable["name"] for variable in dashboard["templating"]["list"]}
    panels = dashboard["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Per node")
    per_node = panels[row + 1:]
    assert len(per_node) >= 3
    for panel in per_node:
        for target in panel["targets"]:
            assert "by (node_id)" in target["expr"] and '$node_id' in target["expr"], target
