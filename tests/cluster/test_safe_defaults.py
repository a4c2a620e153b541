"""Safe defaults: a model's own code never runs unless trusted, the API key guards
every route but /health, and request contents stay out of the logs unless asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu
from support import REPO

from pagedserve import LLM
from pagedserve.config import load, parse
from pagedserve.model.resolve import load_hf_config
from pagedserve.testing import build_random_model

CONFIGS = REPO / "configs"
API_KEY = SERVED_API_KEY  # the shared app's, and the one the loud app is given
SECRET = "zebra-quartz-7731"  # a prompt marker that must not reach the logs


def _model_with_its_own_code(root: Path) -> tuple[Path, Path]:
    """A model whose config.json points at a Python file that leaves a mark when it runs."""
    directory = build_random_model(root / "model", arch="llama")
    marker = root / "code-ran"
    (directory / "custom_config.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class CustomConfig(LlamaConfig):\n"
        "    model_type = 'pagedserve-custom'\n")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="pagedserve-custom",
                  auto_map={"AutoConfig": "custom_config.CustomConfig"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


def test_a_models_own_code_runs_only_with_trust_remote_code(tmp_path):
    directory, marker = _model_with_its_own_code(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(model=str(directory), device="cpu", num_gpu_blocks=16)
    assert not marker.exists()
    # The switch is real: trusted, the same directory's code runs.
    load_hf_config(directory, trust_remote_code=True)
    assert marker.exists()


def test_trust_remote_code_is_off_in_every_shipped_config():
    for path in CONFIGS.glob("*.yaml"):
        assert load(path).model.trust_remote_code is False, path


def _logs_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def _logged(text: str) -> bool:
    for path in _logs_dir().rglob("*"):
        if path.is_file() and text.encode() in path.read_bytes():
            return True
    return False


def _deploy(serve_instance, name: str, **serving) -> str:
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["parallel"].update(worker_cpus=0.25)
    data["serving"].update(api_key=API_KEY, **serving)
    serve.run(build(parse(data)), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve_instance.http}/{name}"


def _send_secrets(url: str, marker: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    good = {"model": "tiny-llama", "prompt": f"{marker} hello", "max_tokens": 3,
            "stop": [marker]}
    assert httpx.post(f"{url}/v1/completions", json=good, headers=headers,
                      timeout=60).status_code == 200
    chat = {"model": "tiny-llama", "max_tokens": 3,
            "messages": [{"role": "user", "content": marker}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers,
                      timeout=60).status_code == 200
    bad = {**good, "temperature": -1}  # refused, with the prompt in the body
    assert httpx.post(f"{url}/v1/completions", json=bad, headers=headers,
                      timeout=60).status_code == 400


def test_request_contents_are_logged_only_when_enabled(serve_instance, shared_app):
    import time

    from ray import serve

    quiet = shared_app(SERVED_TINY_CPU, served_tiny_cpu()).proxy  # log_requests: the default
    _send_secrets(quiet, SECRET)
    loud = _deploy(serve_instance, "loud", log_requests=True)
    _send_secrets(loud, SECRET + "-loud")
    for _ in range(100):  # Serve writes its log records in batches
        if _logged(SECRET + "-loud"):
            break
        time.sleep(0.1)
    assert _logged(SECRET + "-loud"), "log_requests: true logs nothing"
    serve.delete("loud")
    # The quiet app's prompt, stop string and chat message are nowhere, though the loud one's are.
    assert not _logged(f"{SECRET} hello") and not _logged(f'"{SECRET}"')


def test_the_api_key_guards_every_route_but_health(shared_app):
    url = shared_app(SERVED_TINY_CPU, served_tiny_cpu()).proxy
    headers = {"Authorization": f"Bearer {API_KEY}"}
    schema = httpx.get(f"{url}/openapi.json", headers=headers, timeout=60)
    assert schema.status_code == 200, schema.text
    routes = [(method.upper(), path) for path, methods in schema.json()["paths"].items()
              for method in methods] + [("GET", "/openapi.json")]
    assert {path for _, path in routes} >= {"/health", "/v1/models", "/v1/completions",
                                            "/v1/chat/completions", "/stats", "/openapi.json"}
    for method, path in routes:
        for given in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, f"{url}{path}", json={}, headers=given, timeout=60)
            if path == "/health":
                assert response.status_code == 200, response.text
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.json()["error"]["code"] == "invalid_api_key"
