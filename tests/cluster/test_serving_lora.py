"""LoRA adapters served by name, through the `openai` client and vLLM's load and
unload routes: /v1/models lists them with their parent, a request naming one
gets what the offline engine gives under the same adapter, an unknown name is a
404 listing what exists, and a bad load is a 400 that lists nothing."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from conftest import direct_url
from support import REPO

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.cluster.proto import pagedserve_pb2 as pb
from pagedserve.cluster.proto import pagedserve_pb2_grpc as pb_grpc
from pagedserve.config import load, parse
from pagedserve.testing import cached_random_model
from pagedserve.testing.lora import build_lora_adapter

pytest.importorskip("peft")

API_KEY = "lora-key"
APP = "pagedserve-lora-test"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
PROMPT = "The quick brown fox"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    spec = load(CONFIG).model.random_init
    base = cached_random_model(spec.name, arch=spec.arch, seed=spec.seed,
                               **spec.config_overrides)
    root = tmp_path_factory.mktemp("served-adapters")
    return {"sql": build_lora_adapter(base, root / "sql", 8, ["q_proj", "v_proj"], seed=1),
            "chat": build_lora_adapter(base, root / "chat", 4, ["gate_proj", "down_proj"],
                                       seed=2),
            "too-big": build_lora_adapter(base, root / "too-big", 64, ["q_proj"], seed=3)}


@pytest.fixture(scope="module")
def config(adapter_dirs):
    data = load(CONFIG).model_dump()
    data["serving"].update(api_key=API_KEY, served_model_name="base")
    data["parallel"].update(worker_cpus=0.5)
    data["lora"] = {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1,
                    "allow_runtime_updates": True,
                    "modules": [{"name": "sql", "path": str(adapter_dirs["sql"])}]}
    return parse(data)


@pytest.fixture(scope="module")
def url(serve_instance, config):
    from ray import serve

    from pagedserve.cluster.app import build

    serve.run(build(config), name=APP, route_prefix="/lora-test")
    yield f"{direct_url(APP)}/lora-test"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(config):
    return LLM(config=config)


def _offline_text(offline: LLM, lora: LoRARequest | None) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=12)
    return offline.generate(PROMPT, params, lora_request=lora, use_tqdm=False)[0].outputs[0].text


def _complete(client, model: str, stream: bool = False) -> str:
    if stream:
        chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                           temperature=0.0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                     temperature=0.0).choices[0].text


def test_models_lists_adapters_with_their_parent(client, adapter_dirs):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"base", "sql"}
    assert cards["sql"].parent == "base" and cards["sql"].root == str(adapter_dirs["sql"])
    assert cards["base"].parent is None


def test_a_request_naming_an_adapter_runs_under_it(client, offline, adapter_dirs):
    sql = LoRARequest("sql", 1, str(adapter_dirs["sql"]))
    expected = _offline_text(offline, sql)
    assert expected != _offline_text(offline, None)  # the adapter changes the answer
    assert _complete(client, "sql") == expected
    assert _complete(client, "sql", stream=True) == expected
    assert _complete(client, "base") == _offline_text(offline, None)


def test_unknown_model_is_a_404_listing_what_exists(client):
    with pytest.raises(openai.NotFoundError) as missing:
        _complete(client, "nope")
    assert "base, sql" in str(missing.value) and missing.value.body["param"] == "model"


def _post(url: str, route: str, body: dict, headers=HEADERS) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60)


def test_load_and_unload_at_run_time(url, client, offline, adapter_dirs):
    chat = {"lora_name": "chat", "lora_path": str(adapter_dirs["chat"])}
    assert _post(url, "load_lora_adapter", chat, headers={}).status_code == 401
    refused = _post(url, "load_lora_adapter",
                    {"lora_name": "big", "lora_path": str(adapter_dirs["too-big"])})
    assert refused.status_code == 400 and "exceeds max_lora_rank=16" in refused.text
    missing = _post(url, "load_lora_adapter", {"lora_name": "gone", "lora_path": "/nowhere"})
    assert missing.status_code == 400 and "adapter_config.json" in missing.text
    assert {card.id for card in client.models.list().data} == {"base", "sql"}

    loaded = _post(url, "load_lora_adapter", chat)
    assert loaded.status_code == 200, loaded.text
    assert _post(url, "load_lora_adapter", chat).status_code == 400  # already loaded
    assert {card.id for card in client.models.list().data} == {"base", "sql", "chat"}
    # One device slot: sql and chat take turns in it.
    expected = _offline_text(offline, LoRARequest("chat", 9, chat["lora_path"]))
    assert _complete(client, "chat") == expected
    assert _complete(client, "sql") == _offline_text(offline, LoRARequest(
        "sql", 1, str(adapter_dirs["sql"])))
    assert _complete(client, "chat", stream=True) == expected

    assert _post(url, "unload_lora_adapter", {"lora_name": "chat"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "chat")
    assert _post(url, "unload_lora_adapter", {"lora_name": "chat"}).status_code == 404
    # Loaded again under the same name: served again.
    assert _post(url, "load_lora_adapter", chat).status_code == 200
    assert _complete(client, "chat") == expected
    stats = httpx.get(f"{url}/stats", headers=HEADERS, timeout=60).json()
    assert stats["lora_loads"] >= 3 and stats["lora_evictions"] >= 2
    assert stats["lora_running"] == {} and stats["free_blocks"] == stats["total_blocks"]


def test_grpc_takes_an_adapter_name(serve_instance, url, client):
    metadata = (("application", APP), ("authorization", f"Bearer {API_KEY}"))
    with grpc.insecure_channel(f"127.0.0.1:{serve_instance.grpc}") as channel:
        reply = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(model="sql", prompt=PROMPT, max_tokens=12, temperature=0.0),
            metadata=metadata, timeout=60)
    assert reply.choices[0].text == _complete(client, "sql")


def test_lora_metrics_reach_rays_endpoint(url, client, ray_metrics_url):
    import re
    import time

    _complete(client, "sql")

    def samples(text: str, metric: str) -> list[tuple[str, float]]:
        pattern = re.compile(rf'^ray_pagedserve_{metric}\{{([^}}]*)\}} (\S+)$', re.M)
        return [(tags, float(value)) for tags, value in pattern.findall(text)
                if 'model_name="base"' in tags]

    def exported(text: str) -> bool:
        return (sum(v for _, v in samples(text, "lora_loads_total")) >= 3
                and sum(v for _, v in samples(text, "lora_evictions_total")) >= 2
                and bool(samples(text, "lora_requests_info")))

    # Ray exports every 0.5 s here, each metric on its own: wait for all three.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(ray_metrics_url, timeout=10).text
        if exported(text):
            break
        time.sleep(0.5)
    assert sum(v for _, v in samples(text, "lora_loads_total")) >= 3  # sql, chat, sql, ...
    assert sum(v for _, v in samples(text, "lora_evictions_total")) >= 2
    info = samples(text, "lora_requests_info")
    assert info and all('max_lora="1"' in tags for tags, _ in info)
