"""Reliability figures: load held, faults survived, blocks leaked, requests lost.

One replica of configs/tiny-cpu.yaml (the model in a worker actor, as served),
driven by pagedserve.testing.load's mixed clients (plain, streamed, chat, n=2,
and streams left after a few chunks):

1. Load held: `--clients` levels, `--phase-s` seconds each. Reported per level:
   requests sent and their outcomes, requests/s, tokens/s.
2. Faults under load: 32 clients for `--fault-s` seconds while the worker
   process is SIGKILLed at a third of the way and the replica process at two
   thirds. Reported: outcomes (the requests in flight at a kill end as errors
   or 503 + Retry-After; none may be lost), and seconds from each kill to the
   first request served by the new replica.
3. Flood: `--flood` requests at once, each with a 1,800-token prompt, on a
   second app whose queues are bounded at 64 (max_waiting_requests and
   max_queued_requests). Reported: answers by status, and the replica's peak
   resident memory before and after.
4. After each phase: blocks still allocated (leaked) and requests still queued.

With `--nodes N`, a cluster of N nodes on this machine instead
(`ray.cluster_utils.Cluster`: the head with two CPUs, N - 1 worker nodes with
one each), and one phase: two replicas on two worker nodes under 32 clients for
`--fault-s` seconds, and at a third of the way the node holding one replica
(and its worker, not the ingress) is removed. Reported: the outcomes, seconds
from the removal to two replicas serving again, and blocks leaked on both.

    python benchmarks/reliability.py [--clients 16 64 128] [--phase-s 30] [--fault-s 90]
    python benchmarks/reliability.py --nodes 3 [--fault-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from pagedserve.cluster.app import build, serve_environment
from pagedserve.config import load, parse
from pagedserve.testing.load import flood, mixed_load

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = "tiny-llama"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=60).json()


def leftovers(url: str) -> dict:
    """Blocks still held and requests still queued once the clients are gone."""
    for _ in range(100):
        s = stats(url)
        if s["num_running"] == s["num_waiting"] == s["num_swapped"] == 0:
            break
        time.sleep(0.1)
    return {"blocks_leaked": s["total_blocks"] - s["free_blocks"],
            "requests_queued": s["num_running"] + s["num_waiting"] + s["num_swapped"]}


def recovery_s(url: str, old_pid: int, killed_at: float) -> float:
    """Seconds from a kill until a request is served by another replica process."""
    while True:
        try:
            response = httpx.post(f"{url}/v1/completions", timeout=30,
                                  json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            if response.status_code == 200 and stats(url)["pid"] != old_pid:
                return time.monotonic() - killed_at
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def background_load(url: str, duration_s: float, result: dict) -> threading.Thread:
    """32 mixed clients for `duration_s` in a thread of their own; their summary goes
    to result["load"]."""

    def run_load() -> None:
        result["load"] = asyncio.run(mixed_load(url, MODEL, clients=32, duration_s=duration_s,
                                                seed=7)).summary()

    loader = threading.Thread(target=run_load)
    loader.start()
    return loader


def faults(url: str, duration_s: float) -> dict:
    result: dict = {}
    start = time.monotonic()
    loader = background_load(url, duration_s, result)
    for name, at in (("worker", 1 / 3), ("replica", 2 / 3)):
        time.sleep(max(0.0, start + duration_s * at - time.monotonic()))
        before = stats(url)
        killed_at = time.monotonic()
        os.kill(before["worker_pids"][0] if name == "worker" else before["pid"], signal.SIGKILL)
        result[f"{name}_kill_recovery_s"] = recovery_s(url, before["pid"], killed_at)
    loader.join()
    return result


def flood_phase(port: int, count: int) -> dict:
    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["serving"].update(max_waiting_requests=64, max_queued_requests=64)
    serve.run(build(parse(data)), name="flood", route_prefix="/flood")
    url = f"http://127.0.0.1:{port}/flood"
    rss_before = stats(url)["peak_rss_bytes"]
    start = time.monotonic()
    answers = asyncio.run(flood(url, MODEL, count))
    seconds = time.monotonic() - start
    statuses: dict[str, int] = {}
    for answer in answers:
        key = (type(answer).__name__ if isinstance(answer, Exception)
               else f"{answer.status_code}" + (" + Retry-After" if answer.headers.get(
                   "retry-after") else ""))
        statuses[key] = statuses.get(key, 0) + 1
    whole = sum(1 for a in answers if not isinstance(a, Exception) and a.status_code == 200
                and a.json()["usage"]["completion_tokens"] == 8)
    result = {"requests": count, "seconds": seconds, "statuses": statuses,
              "accepted_and_whole": whole, "peak_rss_mib_before": rss_before / 2**20,
              "peak_rss_mib_after": stats(url)["peak_rss_bytes"] / 2**20, **leftovers(url)}
    serve.delete("flood")
    return result


def node_loss(cluster, port: int, duration_s: float) -> dict:
    from ray.util.placement_group import remove_placement_group

    from pagedserve.testing.nodes import hold_cpus, ingress_node, replica_nodes, replica_stats

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"].update(worker_cpus=0.9)  # a replica and its worker per one-CPU node
    data["autoscaling"].update(min_replicas=2, max_replicas=2)
    data["serving"].update(health_check_period_s=1.0, health_check_timeout_s=10.0)
    held = hold_cpus(2)  # the head's: the two replicas start on worker nodes
    try:
        serve.run(build(parse(data)), name="nodes", route_prefix="/")
    finally:
        remove_placement_group(held)  # the lost replica's replacement may go there
    url = f"http://127.0.0.1:{port}"
    placed = replica_nodes(url, 2)
    ingress = ingress_node("nodes")
    victim = next(pid for pid, node in placed.items() if node != ingress)
    node = next(n for n in cluster.worker_nodes if n.node_id == placed[victim])
    result: dict = {}
    start = time.monotonic()
    loader = background_load(url, duration_s, result)
    time.sleep(duration_s / 3)
    removed_at = time.monotonic()
    cluster.remove_node(node)
    while victim in (now := replica_nodes(url, 2, timeout=300)):
        time.sleep(0.2)
    result["recovery_s"] = time.monotonic() - removed_at
    result["removed_at_s"] = removed_at - start
    result["removed_node"] = placed[victim]
    result["replica_nodes_after"] = sorted(now.values())
    loader.join()
    for _ in range(100):  # the clients are gone: what the replicas still hold
        idle = replica_stats(url, 2)
        if all(s["num_running"] == s["num_waiting"] == 0 for s in idle.values()):
            break
        time.sleep(0.1)
    result["blocks_leaked"] = sum(s["total_blocks"] - s["free_blocks"] for s in idle.values())
    result["requests_queued"] = sum(s["num_running"] + s["num_waiting"] for s in idle.values())
    serve.delete("nodes")
    return result


def main_nodes(args: argparse.Namespace) -> None:
    from ray.cluster_utils import Cluster

    serve_environment()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                            "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    port = free_port()
    # One proxy, on the head: the nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    lost = node_loss(cluster, port, args.fault_s)
    f = lost["load"]
    print(f"node removed under load ({args.nodes} nodes, 32 clients, {args.fault_s:.0f} s, "
          f"removed at {lost['removed_at_s']:.0f} s): sent {f['sent']}, ok {f['ok']}, "
          f"left {f['left']}, refused {f['refused']}, errored {f['errored']}, lost {f['lost']}; "
          f"two replicas serving again after {lost['recovery_s']:.1f} s; blocks leaked "
          f"{lost['blocks_leaked']}, queued {lost['requests_queued']}")
    for failure in f["failures"]:
        print("  e.g.", failure)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    (args.out_dir / "reliability-nodes.json").write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(), cpus=os.cpu_count(),
        args={k: str(v) for k, v in vars(args).items()}, node_loss=lost), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--phase-s", type=float, default=30.0)
    parser.add_argument("--fault-s", type=float, default=90.0)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes of a simulated cluster (>= 3: the node-loss phase only)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.nodes > 1:
        if args.nodes < 3:
            parser.error("--nodes: at least 3 (the head and two worker nodes, one per replica)")
        return main_nodes(args)

    serve_environment()
    port = free_port()
    ray.init(logging_level="ERROR", include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["serving"].update(health_check_period_s=2.0)
    serve.run(build(parse(data)), name="reliability", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    rows = []
    print("| clients | sent | ok | left | refused | errored | lost | req/s | tok/s "
          "| blocks leaked | queued after |\n" + "|---:" * 11 + "|")
    for clients in args.clients:
        summary = asyncio.run(mixed_load(url, MODEL, clients=clients,
                                         duration_s=args.phase_s)).summary()
        row = {"clients": clients, **summary, **leftovers(url)}
        rows.append(row)
        print(f"| {clients} | {row['sent']} | {row['ok']} | {row['left']} | {row['refused']} "
              f"| {row['errored']} | {row['lost']} | {row['requests_per_s']:.1f} "
              f"| {row['tokens_per_s']:.0f} | {row['blocks_leaked']} | {row['requests_queued']} |",
              flush=True)
    fault = faults(url, args.fault_s)
    fault.update(leftovers(url))
    f = fault["load"]
    print(f"\nfaults under load (32 clients, {args.fault_s:.0f} s; worker killed, then replica): "
          f"sent {f['sent']}, ok {f['ok']}, left {f['left']}, refused {f['refused']}, "
          f"errored {f['errored']}, lost {f['lost']}; recovered in "
          f"{fault['worker_kill_recovery_s']:.1f} s (worker) and "
          f"{fault['replica_kill_recovery_s']:.1f} s (replica); blocks leaked "
          f"{fault['blocks_leaked']}, queued {fault['requests_queued']}")
    for failure in f["failures"]:
        print("  e.g.", failure)
    serve.delete("reliability")  # its worker's CPU goes to the flood app's
    flooded = flood_phase(port, args.flood)
    print(f"\nflood: {flooded['requests']} requests at once in {flooded['seconds']:.0f} s: "
          f"{flooded['statuses']}; {flooded['accepted_and_whole']} accepted and whole; "
          f"replica peak RSS {flooded['peak_rss_mib_before']:.0f} -> "
          f"{flooded['peak_rss_mib_after']:.0f} MiB; blocks leaked {flooded['blocks_leaked']}, "
          f"queued {flooded['requests_queued']}")
    serve.shutdown()
    ray.shutdown()
    (args.out_dir / "reliability.json").write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(), cpus=os.cpu_count(),
        args={k: str(v) for k, v in vars(args).items()}, load=rows, faults=fault,
        flood=flooded), indent=2))


if __name__ == "__main__":
    main()
