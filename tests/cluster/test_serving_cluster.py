"""Serving beyond one plain replica: the waiting-queue bound (503 + Retry-After), and
tensor-parallel replicas gang-placed with their workers through Serve's placement group,
for the architectures beyond Llama's (experts, sliding windows), each serving its
offline greedy text. Llama at TP=2 from the shipped config: tests/worker/test_tensor_parallel.py.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support import REPO

from pagedserve import LLM, SamplingParams
from pagedserve.config import load, parse

CONFIGS = REPO / "configs"


def _app(serve_instance, name: str, config_file: str, **sections):
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / config_file).model_dump()
    for section, values in sections.items():
        data[section].update(values)
    config = parse(data)
    serve.run(build(config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve_instance.http}/{name}", config


def test_full_waiting_queue_answers_503_with_retry_after(serve_instance):
    from ray import serve

    # One running sequence and one waiting request at most.
    url, _ = _app(serve_instance, "limits", "tiny-cpu.yaml",
                  engine={"max_num_seqs": 1}, serving={"max_waiting_requests": 1},
                  parallel={"worker_cpus": 0.25})
    body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    release = threading.Event()

    def hold() -> None:
        """Stream until released (the waiting one streams only once the first is gone)."""
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and release.wait(timeout=120):
                    return

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    try:
        for thread in holders:
            thread.start()
        for _ in range(1200):  # until one runs and one waits
            stats = httpx.get(f"{url}/stats").json()
            if stats["num_running"] == 1 and stats["num_waiting"] == 1:
                break
            time.sleep(0.05)
        assert stats["num_running"] == 1 and stats["num_waiting"] == 1, stats
        refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "1 requests are waiting (limit 1)" in refused.json()["error"]["message"]
    finally:
        release.set()
        for thread in holders:
            thread.join(timeout=60)
    # Both held requests were aborted when their clients left: nothing is held.
    for _ in range(200):
        stats = httpx.get(f"{url}/stats").json()
        if stats["num_running"] == stats["num_waiting"] == 0:
            break
        time.sleep(0.05)
    assert stats["free_blocks"] == stats["total_blocks"], stats
    serve.delete("limits")


def _gang_placed() -> bool:
    """A TP=2 replica's own placement group is there: its bundle, then one per rank."""
    from ray.util import placement_group_table

    groups = [g for g in placement_group_table().values()
              if g["state"] == "CREATED" and len(g["bundles"]) == 3]
    return any(g["bundles"][1] == g["bundles"][2] == {"CPU": 0.25} for g in groups)


@pytest.mark.parametrize("arch, options, parallel", [
    # Experts placed whole on the two ranks; tokens reach them through the all-reduce.
    ("qwen3_moe", dict(num_key_value_heads=2), dict(enable_expert_parallel=True)),
    # Each expert's features split over the two ranks.
    ("mixtral", dict(num_key_value_heads=2), {}),
    ("qwen3", dict(num_key_value_heads=2), {}),  # per-head q/k norms
    # Local (sliding) and global layers; a prompt past the window of 24.
    ("gemma3", {}, {}),
])
def test_tp2_replicas_are_gang_placed_and_serve_the_offline_greedy_text(serve_instance, arch,
                                                                         options, parallel):
    from ray import serve

    model = {"random_init": {"name": f"serve-{arch}", "arch": arch, "seed": 0,
                             "config_overrides": options}, "dtype": "float32",
             "max_model_len": 256}
    name = f"tp2-{arch.replace('_', '-')}"
    url, config = _app(serve_instance, name, "tiny-cpu-tp2.yaml", model=model,
                       parallel={"worker_cpus": 0.25, **parallel})
    prompt = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun"
    try:
        result = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": f"serve-{arch}", "prompt": prompt, "max_tokens": 10,
            "temperature": 0}).json()
        assert _gang_placed()  # the replica with its workers, through Serve
    finally:
        serve.delete(name)
    data = config.model_dump()
    data["parallel"].update(tensor_parallel_size=1, distributed_executor_backend="local",
                            enable_expert_parallel=False)
    offline = LLM(config=parse(data))
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=10),
                                use_tqdm=False)[0]
    assert len(expected.prompt_token_ids) > 24
    assert result["choices"][0]["text"] == expected.outputs[0].text


def test_served_model_runs_in_worker_actors_unless_local_is_asked_for():
    from pagedserve.cluster.app import served, server_options

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"]["worker_cpus"] = 0.5
    auto = served(parse(data))
    assert auto.parallel.executor_backend == "ray"
    options = server_options(auto)
    assert options["placement_group_bundles"] == [{"CPU": 0.01}, {"CPU": 0.5}]
    assert options["ray_actor_options"] == {"num_cpus": 0.01}

    data["parallel"]["distributed_executor_backend"] = "local"
    local = served(parse(data))
    assert local.parallel.executor_backend == "local"
    options = server_options(local)
    assert "placement_group_bundles" not in options
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
