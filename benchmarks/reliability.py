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

    python benchmarks/reliability.py [--clients 16 64 128] [--phase-s 30] [--fault-s 90]
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


def faults(url: str, duration_s: float) -> dict:
    result: dict = {}

    def run_load() -> None:
        result["load"] = asyncio.run(mixed_load(url, MODEL, clients=32, duration_s=duration_s,
                                                seed=7)).summary()

    loader = threading.Thread(target=run_load)
    start = time.monotonic()
    loader.start()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--phase-s", type=float, default=30.0)
    parser.add_argument("--fault-s", type=float, default=90.0)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

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
