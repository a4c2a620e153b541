"""The served app over several nodes (ray.cluster_utils.Cluster nodes beside the
session's head, each its own raylet on this machine):

- two replicas on two worker nodes both serve, and the prefix-aware router keeps
  a shared prefix on one of them;
- the node holding one replica is removed under load: that replica's requests
  end at once with an error, the other's finish whole, Serve starts a new
  replica on a surviving node, no block is held afterwards and every new
  request succeeds;
- under load the autoscaler asks for a replica that no node has room for, and a
  node added then takes it.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import threading
import time

import httpx
import pytest
from conftest import free_port, worker_nodes
from support import REPO

from pagedserve.config import load, parse
from pagedserve.testing.nodes import hold_cpus, ingress_node, replica_nodes, replica_stats

CONFIGS = REPO / "configs"
MODEL = "tiny-llama"
APP = "nodes"
# A replica and its worker take 0.91 CPU: one per one-CPU worker node.
WORKER_CPUS = 0.9


@pytest.fixture(scope="module")
def two_nodes(cluster, ray_cluster):
    """Two one-CPU worker nodes, each with a metrics port of its own."""
    with worker_nodes(cluster, *({"num_cpus": 1, "metrics_export_port": free_port()}
                                 for _ in range(2))) as added:
        yield cluster, added


def _hold_head():
    """The head's two CPUs held (no worker node has two), so that replicas start on the
    worker nodes; the caller removes the group."""
    return hold_cpus(2)


def _replica_stats(url: str, count: int, key: str) -> dict[int, float]:
    return {pid: stats[key] for pid, stats in replica_stats(url, count).items()}


@pytest.fixture(scope="module")
def app(serve_instance, two_nodes):
    from ray import serve
    from ray.util.placement_group import remove_placement_group

    from pagedserve.cluster.app import build

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"].update(worker_cpus=WORKER_CPUS)
    data["autoscaling"].update(min_replicas=2, max_replicas=2)
    data["serving"].update(request_router="prefix_aware", routing_stats_period_s=0.5,
                           health_check_period_s=1.0, health_check_timeout_s=10.0)
    held = _hold_head()
    try:
        serve.run(build(parse(data)), name=APP, route_prefix=f"/{APP}")
    finally:
        remove_placement_group(held)  # a replacement replica may start on the head
    url = f"http://127.0.0.1:{serve_instance.http}/{APP}"
    yield url
    serve.delete(APP)


def _complete(url: str, prompt, max_tokens: int = 4) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_two_replicas_on_two_nodes_serve_and_a_shared_prefix_stays_on_one(app, two_nodes):
    _, added = two_nodes
    nodes = replica_nodes(app, 2)
    assert set(nodes.values()) == {node.node_id for node in added}, nodes
    rng = random.Random(0)
    system = [rng.randrange(6, 500) for _ in range(80)]  # 5 full blocks
    for _ in range(6):
        _complete(app, system + [rng.randrange(6, 500) for _ in range(8)])
    # The six went to one replica: the five after the first hit its 5 blocks.
    hits = _replica_stats(app, 2, "prefix_cache_hits")
    assert sorted(hits.values()) == [0, 5 * 80], hits
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: _complete(app, [rng.randrange(6, 500)
                                                          for _ in range(40)]), range(8)))
    assert all(a["usage"]["completion_tokens"] == 4 for a in answers)
    served = _replica_stats(app, 2, "prefix_cache_queries")
    assert all(queries > 0 for queries in served.values()), served  # both served


LONG = 1500  # tokens: still streaming when the node goes


def _stream(url: str, prompt: str) -> dict:
    """One streamed completion to its end: its status, its error event if any, and the
    tokens its final usage counts."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=180) as reply:
        status = reply.status_code
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
    return {"status": status, "error": next((e["error"] for e in events if "error" in e), None),
            "tokens": usage["completion_tokens"] if usage else 0}


def _running_by_node(two_nodes, head_metrics_url: str) -> dict[str, float]:
    """Requests running per node, summed over its replicas, from every node's metrics."""
    _, added = two_nodes
    urls = [head_metrics_url] + [f"http://127.0.0.1:{node.metrics_export_port}/metrics"
                                 for node in added if node in two_nodes[0].worker_nodes]
    running: dict[str, float] = {}
    for url in urls:
        for line in httpx.get(url, timeout=10).text.splitlines():
            if line.startswith("ray_pagedserve_num_requests_running{") and (
                    f'model_name="{MODEL}"' in line):
                node = re.search(r'node_id="([^"]*)"', line).group(1)
                running[node] = running.get(node, 0.0) + float(line.rsplit(" ", 1)[1])
    return {node: value for node, value in running.items() if value}


def test_a_node_lost_under_load_fails_only_its_replicas_requests_and_is_replaced(
        app, two_nodes, ray_metrics_url):
    cluster, added = two_nodes
    nodes = replica_nodes(app, 2)
    # The node to lose holds a replica (and its worker) but not the ingress, whose loss
    # would cut the clients' connections instead.
    ingress = ingress_node(APP)
    victim = next(pid for pid, node in nodes.items() if node != ingress)
    node = next(n for n in added if n.node_id == nodes[victim])
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        streams = [pool.submit(_stream, app, f"Request {i} of the node-loss test")
                   for i in range(8)]
        # Until all eight run, on both replicas, as each node's metrics say (the
        # replicas' own gauges, tagged with their node).
        deadline = time.monotonic() + 60
        running: dict[str, float] = {}
        while time.monotonic() < deadline:
            previous, running = running, _running_by_node(two_nodes, ray_metrics_url)
            if running == previous and sum(running.values()) == 8 and len(running) == 2:
                break
            time.sleep(1.0)  # two readings alike, a report interval apart
        assert (sum(running.values()), len(running)) == (8, 2), running
        lost = running[nodes[victim]]
        cluster.remove_node(node)
        results = [stream.result(timeout=180) for stream in streams]  # none hangs
    failed = [r for r in results if r["error"] is not None]
    whole = [r for r in results if r["error"] is None and r["tokens"] == LONG]
    # The lost replica's requests end with a clear error; the other's run to the end.
    assert (len(failed), len(whole)) == (lost, 8 - lost), results
    assert all(r["status"] == 200 and r["error"]["code"] in {"replica_unavailable",
                                                              "engine_dead"} for r in failed)
    # Serve starts a replacement on a surviving node; nothing is held; new requests succeed.
    now = replica_nodes(app, 2, timeout=180)  # the lost replica answers no more
    assert victim not in now and nodes[victim] not in now.values(), now
    for i in range(8):
        assert _complete(app, f"After the loss {i}")["usage"]["completion_tokens"] == 4
    idle = {pid: (s["free_blocks"], s["total_blocks"], s["num_running"]) for pid, s in
            replica_stats(app, 2).items()}
    assert all(free == total and not running for free, total, running in idle.values()), idle


def _states(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["LLMServer"].replica_states)


def test_scale_out_onto_a_node_added_under_load(serve_instance, two_nodes, app):
    """The autoscaler asks for a second replica that no node has room for; a node
    added then takes it, and it serves."""
    from ray import serve
    from ray.util.placement_group import remove_placement_group

    from pagedserve.cluster.app import build

    cluster, _ = two_nodes
    serve.delete(APP)  # the node-loss test's replicas: their CPUs are free again
    data = load(CONFIGS / "tiny-cpu-autoscale.yaml").model_dump()
    data["parallel"].update(worker_cpus=WORKER_CPUS)
    held = _hold_head()
    stop, failures = threading.Event(), []
    url = f"http://127.0.0.1:{serve_instance.http}/scale"
    body = {"model": MODEL, "prompt": "Scale me " * 30, "max_tokens": 300, "ignore_eos": True}

    def client() -> None:
        while not stop.is_set():
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            if answer.status_code != 200:
                failures.append(f"{answer.status_code}: {answer.text}")

    added = None
    try:
        serve.run(build(parse(data)), name="scale", route_prefix="/scale")
        first = replica_nodes(url, 1)
        clients = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for thread in clients:
            thread.start()
        # Asked for, and waiting for room: a second replica that cannot start.
        deadline = time.monotonic() + 120
        while _states("scale").get("STARTING", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(2)
        assert _states("scale") == {"RUNNING": 1, "STARTING": 1}, _states("scale")
        added = cluster.add_node(num_cpus=1)
        deadline = time.monotonic() + 120
        while _states("scale").get("RUNNING", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _states("scale").get("RUNNING", 0) == 2, _states("scale")
        nodes = replica_nodes(url, 2)
        assert added.node_id in nodes.values() and set(first.values()) < set(nodes.values())
        stop.set()
        for thread in clients:
            thread.join(timeout=300)
        assert not failures, failures[:3]
    finally:
        stop.set()
        serve.delete("scale")
        remove_placement_group(held)
        if added is not None:
            cluster.remove_node(added)
