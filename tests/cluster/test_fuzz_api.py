"""Property-based fuzzing of the HTTP API: hostile bodies never make a 500.

Hypothesis builds request bodies from the OpenAI fields, with values that are
sometimes right and often wrong (types, ranges, NaN, huge lists, unicode,
lone surrogates, token ids outside the vocabulary), and sometimes breaks the
bytes themselves (invalid UTF-8, truncation). Every answer must be a success
or a client error naming the problem; a stream may only fail in-band with a
client error; afterwards the server still serves. The examples are
derandomized, so CI runs the same cases every time, and sent eight at a time.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import REPO

from pagedserve.config import load, parse

CONFIGS = REPO / "configs"
API_KEY = "fuzz-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# Per route; a longer run: PAGEDSERVE_FUZZ_EXAMPLES=3000 pytest tests/cluster/test_fuzz_api.py
EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", "300"))
CLIENT_ERRORS = {400, 401, 404, 405, 413, 422}

# Values hostile and plain: what a JSON field may hold.
texts = st.text(max_size=40) | st.sampled_from(["", "\ud800", "\udfff x", "\x00", "é" * 30,
                                                "😀🔥", "\u202e", "stop", "\n\n"])
numbers = (st.integers(-5, 40) | st.sampled_from([-(2**63), 2**31, 2**64, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True))
junk = st.none() | st.booleans() | numbers | texts | st.lists(st.integers(-3, 3), max_size=3) \
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
token_ids = st.lists(st.integers(-2, 600) | st.sampled_from([2**40, -(2**40)]), min_size=0,
                     max_size=40)
prompts = texts | token_ids | st.lists(texts, max_size=3) | st.lists(token_ids, max_size=3) | junk
small_ints = st.integers(-2, 8) | st.sampled_from([129, 10**9]) | junk
stops = texts | st.lists(texts, max_size=8) | junk
probabilities = st.floats(-1.0, 3.0) | st.just(float("nan")) | junk

SAMPLING = {
    "max_tokens": st.integers(-1, 12) | st.sampled_from([10**6, 2**63]) | junk,
    "n": small_ints, "best_of": small_ints, "temperature": probabilities,
    "top_p": probabilities, "top_k": st.integers(-3, 600) | junk, "min_p": probabilities,
    "presence_penalty": probabilities, "frequency_penalty": probabilities,
    "repetition_penalty": probabilities, "seed": numbers | junk, "stop": stops,
    "stop_token_ids": token_ids | junk, "ignore_eos": st.booleans() | junk,
    "stream": st.booleans(), "use_beam_search": st.booleans() | junk,
    "logit_bias": junk, "user": texts, "unknown_field": junk,
}
COMPLETION = {**SAMPLING, "prompt": prompts, "logprobs": small_ints, "echo": junk,
              "suffix": junk, "stream_options": junk | st.just({"include_usage": True})}
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]) | texts},
    optional={"content": texts | junk, "name": texts | junk})
CHAT = {**SAMPLING, "messages": st.lists(message, max_size=4) | junk,
        "logprobs": st.booleans() | junk, "top_logprobs": small_ints,
        "max_completion_tokens": st.integers(-1, 12) | junk}


# Values within the documented ranges: these requests reach the engine and generate,
# with unicode, lone surrogates and control characters in prompts and stop strings.
PLAIN_SAMPLING = {
    "max_tokens": st.integers(1, 12), "n": st.integers(1, 3),
    "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(0, 50), "min_p": st.floats(0.0, 1.0),
    "presence_penalty": st.floats(-2.0, 2.0), "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.5, 2.0), "seed": st.integers(0, 2**31),
    "stop": texts | st.lists(texts, max_size=4), "stop_token_ids": st.lists(
        st.integers(0, 500), max_size=4), "ignore_eos": st.booleans(), "stream": st.booleans(),
}
PLAIN_COMPLETION = {**PLAIN_SAMPLING, "logprobs": st.integers(0, 5)}
PLAIN_CHAT = {**PLAIN_SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)}


def bodies(fields: dict, required: dict) -> st.SearchStrategy[dict]:
    """The required fields, and any subset of the others."""
    return st.fixed_dictionaries(required, optional={k: v for k, v in fields.items()
                                                     if k not in required})


def raw(body: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """JSON (NaN allowed, as Python writes it), sometimes with its bytes broken."""
    encoded = body.map(lambda b: json.dumps(b, allow_nan=True).encode("utf-8", "surrogatepass"))
    broken = st.tuples(encoded, st.binary(min_size=1, max_size=4), st.integers(0, 200)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    return st.one_of(encoded, encoded, encoded, broken, encoded.map(lambda b: b[: len(b) // 2]))


MODEL = st.just("tiny-llama") | st.sampled_from(["", "other", "tiny-llama\u0000"])
plain_prompts = texts | st.lists(st.integers(6, 500), min_size=1, max_size=40)
plain_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                       "content": texts})


@pytest.fixture(scope="module")
def url(serve_instance):
    from ray import serve

    from pagedserve.cluster.app import build

    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["model"]["max_model_len"] = 256  # a default max_tokens stays short
    data["parallel"].update(worker_cpus=0.5)
    data["serving"].update(api_key=API_KEY, max_request_bytes=16 * 1024)
    serve.run(build(parse(data)), name="fuzz", route_prefix="/fuzz")
    base = f"http://127.0.0.1:{serve_instance.http}/fuzz"
    yield base
    serve.delete("fuzz")


def _check(response: httpx.Response, body: bytes) -> None:
    assert response.status_code == 200 or response.status_code in CLIENT_ERRORS, (
        response.status_code, response.text[:500], body[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] != "server_error", error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event or event["error"]["type"] != "server_error", (
                    event, body[:300])


def _fuzz(url: str, route: str, strategy) -> Counter:
    """Draw the examples, then send them eight at a time (the replica batches them, as
    it would a real crowd); how many got each status. A failure names its body."""
    cases: list[tuple[bytes, bool]] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=strategy, key_ok=st.sampled_from([True] * 9 + [False]))
    def draw(body: bytes, key_ok: bool) -> None:
        cases.append((body, key_ok))

    def send(case: tuple[bytes, bool]) -> int:
        body, key_ok = case
        headers = {**(HEADERS if key_ok else {"Authorization": "Bearer wrong"}),
                   "Content-Type": "application/json"}
        response = httpx.post(f"{url}{route}", content=body, headers=headers, timeout=120)
        if not key_ok:
            assert response.status_code == 401, response.text
        else:
            _check(response, body)
        return response.status_code

    draw()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = Counter(pool.map(send, cases))
    print(route, dict(statuses))
    return statuses


def _assert_reached_the_engine(statuses: Counter) -> None:
    assert sum(statuses.values()) >= EXAMPLES
    # Not only refusals: a share of the cases got through to the engine and generated.
    assert statuses[200] >= EXAMPLES // 20, statuses
    assert statuses[400] >= EXAMPLES // 4, statuses


def test_fuzzed_completions_never_fail_the_server(url):
    hostile = bodies(COMPLETION, {"model": MODEL, "prompt": prompts})
    plain = bodies(PLAIN_COMPLETION, {"model": st.just("tiny-llama"), "prompt": plain_prompts})
    _assert_reached_the_engine(_fuzz(url, "/v1/completions", raw(hostile | plain)))


def test_fuzzed_chat_completions_never_fail_the_server(url):
    hostile = bodies(CHAT, {"model": MODEL, "messages": st.lists(message, min_size=1,
                                                                 max_size=3)})
    plain = bodies(PLAIN_CHAT, {"model": st.just("tiny-llama"),
                                "messages": st.lists(plain_message, min_size=1, max_size=3)})
    _assert_reached_the_engine(_fuzz(url, "/v1/chat/completions", raw(hostile | plain)))


@pytest.mark.parametrize("field, value, words", [
    ("prompt", [5, 600], "outside the vocabulary"),
    ("prompt", [5, -1], "prompt"),
    ("n", 129, "n"),
    ("best_of", 10**9, "best_of"),
    ("max_tokens", 10**6, "maximum context length"),
    ("stop", [f"s{i}" for i in range(65)], "stop"),
    ("prompt", "x" * 20000, "bytes"),
    ("prompt", [7] * 300, "maximum context length is 256 tokens"),
])
def test_limits_are_named_in_the_error(url, field, value, words):
    body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2, field: value}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert response.status_code in (400, 413), response.text
    assert words in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("raw_body, words", [
    (b'{"model": "tiny-llama", "prompt": "caf\xe9 \xff"}', "not valid JSON"),
    (b'{"model": "tiny-llama", "prompt": "hi", "stop": ["\xc3"]}', "not valid JSON"),
    (b'{"model": "tiny-llama", "prompt": "\\udc80 hi"}', "lone surrogate"),
])
def test_invalid_utf8_and_lone_surrogates_are_refused(url, raw_body, words):
    response = httpx.post(f"{url}/v1/completions", content=raw_body, timeout=60,
                          headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


def test_server_still_serves_after_the_fuzzing(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    response = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=60,
                          json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    stats = httpx.get(f"{url}/stats", headers=HEADERS).json()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["free_blocks"] == stats["total_blocks"]
