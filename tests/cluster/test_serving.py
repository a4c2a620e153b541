"""The OpenAI-compatible server on Ray Serve, through the official `openai` client.

The session's shared Serve application of tiny-cpu's model (an API key, a small
body limit); the offline `LLM` over the same model is the reference.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu

from pagedserve import LLM, SamplingParams

API_KEY = SERVED_API_KEY
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def config():
    return served_tiny_cpu()


@pytest.fixture(scope="module")
def app_urls(shared_app, config):
    app = shared_app(SERVED_TINY_CPU, config)
    return {"direct": app.direct, "proxy": app.proxy}


@pytest.fixture(scope="module", params=["direct", "proxy"])
def server(request, app_urls):
    """The app's address: its ingress replica itself (direct ingress), or Serve's proxy."""
    return app_urls[request.param]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(config):
    return LLM(config=config)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_equals_offline_greedy(client, offline):
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                       temperature=0)
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12),
                                use_tqdm=False)[0]
    choice = result.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12


def test_streaming_completion_concatenates_to_the_same_text(client):
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=10,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_chat_and_chat_stream(client, offline):
    messages = [{"role": "user", "content": "Hi there"}]
    result = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8,
                                            temperature=0)
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0]
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.outputs[0].text
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    streamed = client.chat.completions.create(model="tiny-llama", messages=messages,
                                              max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == expected.outputs[0].text


def test_n_logprobs_seed_and_stop(client):
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, n=2,
                                       temperature=1.0, seed=5, logprobs=2)
    assert sorted(c.index for c in result.choices) == [0, 1]
    for choice in result.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
        # The top 2 and the sampled token (ids decoding to the same text merge).
        assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
        assert all(choice.logprobs.tokens[i] in top
                   for i, top in enumerate(choice.logprobs.top_logprobs))
    again = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, n=2,
                                      temperature=1.0, seed=5, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    # A stop string taken from the greedy text ends the completion before it.
    greedy = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                       temperature=0).choices[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert greedy.startswith(stopped.text)


def _post(server, path, body, key=API_KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)


COMPLETION = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# (path, body or raw text, key, status, words the message must hold)
BAD_REQUESTS = [
    ("/v1/completions", "{not json", API_KEY, 400, "JSON"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, API_KEY, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, API_KEY, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, API_KEY, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "n": 3, "best_of": 2}, API_KEY, 400, "best_of"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-9"}, API_KEY, 404, "gpt-9"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 3000}, API_KEY, 400, "2048"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 5000}, API_KEY, 400, "5000"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, API_KEY, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, API_KEY, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, -3]}, API_KEY, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": [f"s{i}" for i in range(65)]}, API_KEY, 400,
     "at most 64 stop sequences"),
    ("/v1/completions", {**COMPLETION, "frobnicate": True}, API_KEY, 400, "frobnicate"),
    ("/v1/completions", {k: v for k, v in COMPLETION.items() if k != "model"}, API_KEY, 400,
     "model"),
    ("/v1/completions", COMPLETION, None, 401, "API key"),
    ("/v1/completions", COMPLETION, "wrong-key", 401, "API key"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 100_000}, API_KEY, 413, "65536"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, API_KEY, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
     API_KEY, 400, "role"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, API_KEY, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "use_beam_search": True, "repetition_penalty": 1.2},
     API_KEY, 400, "repetition_penalty"),
    ("/v1/chat/completions", {**CHAT, "chat_template": "{% for m in messages %}"}, API_KEY, 400,
     "chat_template: not a valid Jinja template"),
]


@pytest.mark.parametrize("path, body, key, status, words", BAD_REQUESTS,
                         ids=[f"{i}-{s}-{w}" for i, (_, _, _, s, w) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_an_openai_error(server, path, body, key, status, words):
    raw = body if isinstance(body, str) else None
    response = _post(server, path, body, key=key, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error


def test_server_still_serves_after_bad_requests(server, client):
    for path, body, key, _, _ in BAD_REQUESTS:
        _post(server, path, body, key=key, raw=body if isinstance(body, str) else None)
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=3)
    assert len(result.choices[0].text) > 0
    assert httpx.get(f"{server}/nowhere").json()["error"]["code"] == "404"


def _stats(server):
    return httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {**COMPLETION, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert _stats(server)["num_running"] == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _stats(server)
        if stats["num_running"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_64_concurrent_streaming_clients(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)

    async def one(index: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model="tiny-llama", prompt=f"Request {index} says", max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(run_all())
    assert all(usage == 8 for _, usage in results)
