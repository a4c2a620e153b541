"""The request shapes of real third-party clients, as they send them, against the app.

- lm-eval-harness `local-completions`: loglikelihood requests (token-id prompts,
  `echo`, `logprobs: 1`, `max_tokens: 1`) and generation with five or more stops;
- guidellm's OpenAI backend: `GET /health`, `GET /v1/models`, then streams with
  vLLM's `stream_options.continuous_usage_stats`, `ignore_eos`, and chat content parts.

The bodies are those the clients sent to a logging server (lm-eval 0.4.13,
guidellm 0.8.1); here they go, with an API key as those clients send one, to the
session's shared app. The offline `LLM` on the same config is the reference for values.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu

from pagedserve import LLM, SamplingParams

MODEL = "tiny-llama"
HEADERS = {"Authorization": f"Bearer {SERVED_API_KEY}"}


@pytest.fixture(scope="module")
def config():
    return served_tiny_cpu()


@pytest.fixture(scope="module")
def server(shared_app, config):
    return shared_app(SERVED_TINY_CPU, config).proxy


@pytest.fixture(scope="module")
def offline(config):
    return LLM(config=config)


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers=HEADERS, timeout=120)


def _events(server: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}{path}", json=body, headers=HEADERS,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines()
                 if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_lm_eval_loglikelihood_requests(server, offline):
    tokenizer = offline.get_tokenizer()
    contexts = ["Question: What is the capital of France?\nAnswer:", "The sky is"]
    continuations = [" Paris", " blue today"]
    prompts = [tokenizer(c + x).input_ids for c, x in zip(contexts, continuations, strict=True)]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    expected = offline.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                                use_tqdm=False)
    for prompt, context, choice, reference in zip(prompts, contexts, choices, expected,
                                                  strict=True):
        logprobs = choice["logprobs"]
        # Every prompt token, then the one generated token lm-eval cuts off with [:-1].
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1
        assert logprobs["token_logprobs"][0] is None
        assert all(logprobs["top_logprobs"][i] for i in range(1, len(prompt) + 1))
        for i in range(1, len(prompt)):
            assert logprobs["token_logprobs"][i] == pytest.approx(
                reference.prompt_logprobs[i][prompt[i]], abs=1e-5)
        # lm-eval's own arithmetic: the continuation's logprob sum and greediness.
        context_len = len(tokenizer(context).input_ids)
        total = sum(logprobs["token_logprobs"][context_len:-1])
        assert total == pytest.approx(sum(reference.prompt_logprobs[i][prompt[i]]
                                          for i in range(context_len, len(prompt))), abs=1e-4)
        for i in range(context_len, len(prompt)):
            top = logprobs["top_logprobs"][i]
            assert isinstance(max(top, key=top.get), str)
        assert choice["text"].startswith(tokenizer.decode(prompt))


def test_lm_eval_generation_with_six_stop_strings(server, offline):
    tokenizer = offline.get_tokenizer()
    prompt = tokenizer("Question: Jan has 3 apples and buys 2 more. How many?\nAnswer:").input_ids
    stops = ["Question:", "</s>", "<|im_end|>", "\n\n", "Q:", "###"]
    body = {"prompt": [prompt], "model": MODEL, "max_tokens": 32, "temperature": 0.0,
            "stop": stops, "seed": 1234}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    (expected,) = offline.generate([{"prompt_token_ids": prompt}],
                                   SamplingParams(temperature=0, max_tokens=32, stop=stops),
                                   use_tqdm=False)
    assert choice["text"] == expected.outputs[0].text
    assert not any(stop in choice["text"] for stop in stops)


def test_echo_with_max_tokens_0_returns_the_prompt_only(server, offline):
    prompt = "The quick brown fox"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    result = response.json()
    (choice,) = result["choices"]
    ids = offline.get_tokenizer()(prompt).input_ids
    assert choice["text"] == prompt
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                               "total_tokens": len(ids)}


def test_guidellm_finds_health_and_the_model(server, config):
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200
    (card,) = httpx.get(f"{server}/v1/models", headers=HEADERS, timeout=60).json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == config.model.max_model_len
    # root: where benchmark clients load the tokenizer from.
    assert (Path(card["root"]) / "tokenizer.json").is_file()


def _usage_chunks(events: list[dict]) -> tuple[list[dict], dict]:
    final = events[-1]
    assert final["choices"] == [] and "usage" in final
    return events[:-1], final["usage"]


def test_guidellm_text_stream_with_continuous_usage(server):
    body = {"model": MODEL, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 16, "ignore_eos": True, "prompt": "1 0 m0 Finish medical want almost"}
    chunks, usage = _usage_chunks(_events(server, "/v1/completions", body))
    assert all("usage" in chunk for chunk in chunks)
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 16
    assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks)


def test_guidellm_chat_stream_with_content_parts(server):
    body = {"model": MODEL, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 16, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "1 0 m0 Finish"}]}]}
    chunks, usage = _usage_chunks(_events(server, "/v1/chat/completions", body))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" in chunk for chunk in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == usage["completion_tokens"] == 16
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_unknown_extensions_stay_refused(server):
    body = {"model": MODEL, "prompt": "hi", "logits_processors": ["my.module:Processor"]}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logits_processors"


@pytest.mark.parametrize("path, body, param", [
    # The prompt alone is too long: the prompt is to blame, not max_tokens.
    ("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2047}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}],
                              "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 2047}, "max_completion_tokens"),
    # A token id outside the vocabulary is the prompt's fault.
    ("/v1/completions", {"prompt": [1, 2, 10**6], "max_tokens": 4}, "prompt"),
])
def test_errors_name_the_field_at_fault(server, path, body, param):
    response = _post(server, path, {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
