"""Where a served app's parts run on a cluster of several nodes (tests and benchmarks).

On a `ray.cluster_utils.Cluster` every node is a raylet on one machine with the
same address, so a process is told apart by its Ray node id: LLMServer's
`/stats` names its own, and the ingress replica is asked for its.
"""

from __future__ import annotations

import time

import httpx
import ray


def replica_stats(url: str, count: int, timeout: float = 120) -> dict[int, dict]:
    """pid -> `/stats` of `count` LLMServer replicas, once that many have answered.

    Serve's router spreads the calls over the replicas; one that is starting, or
    being replaced, answers 503 and is waited for.
    """
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}/stats", timeout=30)
        except httpx.HTTPError:
            answer = None
        if answer is not None and answer.status_code == 200:
            seen[answer.json()["pid"]] = answer.json()
        time.sleep(0.05)
    if len(seen) < count:
        raise TimeoutError(f"{len(seen)} of {count} replicas answered within {timeout:g} s")
    return seen


def replica_nodes(url: str, count: int, timeout: float = 120) -> dict[int, str]:
    """pid -> Ray node id of `count` LLMServer replicas."""
    return {pid: stats["node_id"] for pid, stats in replica_stats(url, count, timeout).items()}


def ingress_node(app: str) -> str:
    """The Ray node id of the app's (one) ingress replica."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["namespace"] == "serve" and f"{app}#OpenAIIngress#" in actor["name"]]
    if len(names) != 1:
        raise RuntimeError(f"app {app!r} has {len(names)} ingress replicas, not one")
    actor = ray.get_actor(names[0], namespace="serve")
    return ray.get(actor.__ray_call__.remote(
        lambda _: ray.get_runtime_context().get_node_id()))


def hold_cpus(cpus: float, timeout_s: float = 60):
    """A placement group of one bundle of `cpus` CPUs, placed (the caller removes it):
    it keeps a node that large from taking other work."""
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": cpus}])
    if not group.wait(timeout_seconds=timeout_s):
        raise TimeoutError(f"no node had {cpus:g} CPUs free within {timeout_s:g} s")
    return group
