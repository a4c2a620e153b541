"""The shipped configs load, and each rejected YAML names the key at fault.

Engine and model fields (block_size, gpu_memory_utilization, dtype, unknown
keys in those sections, model sources) are covered in test_validation.py;
these are the parallel, serving and autoscaling sections and the YAML itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedserve import config as config_module

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
MODEL = "model:\n  path: /models/x\n"


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_shipped_config_loads(path):
    config = config_module.load(path)
    assert config.autoscaling.min_replicas <= config.autoscaling.max_replicas


def test_tiny_cpu_tp2_serves_the_tiny_cpu_model():
    tiny = config_module.load(CONFIG_DIR / "tiny-cpu.yaml")
    tp2 = config_module.load(CONFIG_DIR / "tiny-cpu-tp2.yaml")
    assert tp2.model == tiny.model
    assert tp2.parallel.tensor_parallel_size == 2 and tp2.parallel.executor_backend == "ray"


# (YAML after the model section, the key path the error names, other text it must contain)
REJECTED = [
    ("parallel:\n  tensor_parallel: 2\n", "parallel.tensor_parallel", ()),
    ("serving:\n  hostname: 0.0.0.0\n", "serving.hostname", ()),
    ("autoscaling:\n  replicas: 3\n", "autoscaling.replicas", ()),
    ("autoscaling:\n  policy: {name: kv_capacity, queue_threshold: 2}\n",
     "autoscaling.policy.queue_threshold", ()),
    ("parallel:\n  tensor_parallel_size: two\n", "parallel.tensor_parallel_size", ("'two'",)),
    ("serving:\n  port: [8000]\n", "serving.port", ()),
    ("autoscaling: 2\n", "autoscaling", ()),
    ("parallel:\n  tensor_parallel_size: 0\n", "parallel.tensor_parallel_size", ("0",)),
    ("parallel:\n  tensor_parallel_size: 2\n  distributed_executor_backend: local\n",
     "parallel", ("distributed_executor_backend='local'", "tensor_parallel_size=2")),
    ("parallel:\n  placement_strategy: SPREAD_ALL\n", "parallel.placement_strategy",
     ("STRICT_PACK", "SPREAD_ALL")),
    ("parallel:\n  worker_cpus: 0\n", "parallel.worker_cpus", ()),
    ("parallel:\n  ray_compiled_graph: sometimes\n", "parallel.ray_compiled_graph", ("'auto'",)),
    ("serving:\n  port: 70000\n", "serving.port", ("65535", "70000")),
    ("serving:\n  grpc_port: 0\n", "serving.grpc_port", ()),
    ("autoscaling:\n  min_replicas: 3\n  max_replicas: 2\n", "autoscaling",
     ("min_replicas=3", "max_replicas=2")),
    ("autoscaling:\n  min_replicas: 2\n  max_replicas: 4\n  initial_replicas: 1\n", "autoscaling",
     ("initial_replicas=1", "min_replicas=2")),
    ("autoscaling:\n  max_replicas: 2\n  initial_replicas: 5\n", "autoscaling",
     ("initial_replicas=5", "max_replicas=2")),
    ("autoscaling:\n  policy: {name: queue_length}\n", "autoscaling.policy.name",
     ("'kv_utilization', 'kv_capacity'", "queue_length")),
    ("autoscaling:\n  policy: {target_utilization: 0.5}\n", "autoscaling.policy.name",
     ("required",)),
    ("autoscaling:\n  policy: {name: kv_utilization, target_utilization: 1.5}\n",
     "autoscaling.policy.target_utilization", ("1.5",)),
    ("autoscaling:\n  policy: {name: kv_utilization, scale_down_ratio: 1.0}\n",
     "autoscaling.policy.scale_down_ratio", ()),
    ("autoscaling:\n  policy: {name: kv_capacity, downscale_delay_s: -1}\n",
     "autoscaling.policy.downscale_delay_s", ()),
    ("serving:\n  ingress_replicas: 0\n", "serving.ingress_replicas", ("0", "'auto'")),
    ("serving:\n  ingress_replicas: 2\n  direct_ingress: false\n", "serving",
     ("ingress_replicas=2", "direct_ingress")),
    ("serving:\n  ingress_replicas: auto\n  grpc_port: 9000\n", "serving",
     ("ingress_replicas='auto'", "grpc_port=9000")),
    ("serving:\n  port: 8003\n  proxy_port: 8001\n  ingress_replicas: 4\n", "<root>",
     ("serving.port=8003", "8002-8009", "serving.proxy_port")),
    ("serving:\n  proxy_port: 65534\n  ingress_replicas: 2\n", "<root>",
     ("serving.ingress_replicas=2", "65535")),
]


@pytest.mark.parametrize("snippet, key_path, also", REJECTED,
                         ids=[f"{key}-{i}" for i, (_, key, _) in enumerate(REJECTED)])
def test_rejected_yaml_names_its_key_path(tmp_path, snippet, key_path, also):
    path = tmp_path / "bad.yaml"
    path.write_text(MODEL + snippet)
    with pytest.raises(ValueError) as info:
        config_module.load(path)
    message = str(info.value)
    assert str(path) in message
    # One line per error, starting with the exact path: a union's tag is not part of it.
    assert re.search(rf"^  {re.escape(key_path)}: ", message, re.MULTILINE), message
    for text in also:
        assert text in message, (text, message)


def test_several_ingress_replicas_put_haproxy_on_the_port(tmp_path):
    """serving.ingress_replicas above 1 (or `auto`, one per model replica): Serve's
    HAProxy takes `port`, Serve's proxy the proxy port, the replicas ports among twice
    as many after it."""
    from pagedserve.cluster import app

    path = tmp_path / "scaled.yaml"
    path.write_text(MODEL + "serving:\n  port: 9000\n  ingress_replicas: auto\n"
                    "autoscaling:\n  min_replicas: 1\n  max_replicas: 3\n")
    config = config_module.load(path)
    assert config.ingress_replicas == 3
    env = app.serve_env(config)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "9001"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"],
            env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("9002", "9008")
    assert app.http_options(config)["port"] == 9000
    one = config_module.load(CONFIG_DIR / "tiny-cpu.yaml")  # one ingress: it takes the port
    assert one.ingress_replicas == 1 and "RAY_SERVE_ENABLE_HA_PROXY" not in app.serve_env(one)
    assert app.serve_env(one)["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(one.serving.port)
    assert app.http_options(one)["port"] == one.serving.http_proxy_port


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(MODEL + "engine:\n  block_size: [16\n")
    with pytest.raises(ValueError) as info:
        config_module.load(path)
    # The unclosed list runs to the end of the file, where the parser gives up.
    assert str(info.value).startswith(f"{path}, line 5, column 1: not valid YAML: expected")
    assert "\n" not in str(info.value)
