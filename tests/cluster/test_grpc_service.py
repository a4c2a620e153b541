"""The gRPC API through Ray Serve's gRPC proxy, next to the HTTP API of the same app.

The session's shared Serve application of tiny-cpu's model (with an API key); a
grpcio client with the generated stub must get what the OpenAI-compatible HTTP API
gives for the same request.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu

from pagedserve.cluster import errors, protocol
from pagedserve.cluster.grpc_service import request_fields, status_code
from pagedserve.cluster.parsing import validate_request
from pagedserve.cluster.proto import pagedserve_pb2 as pb
from pagedserve.cluster.proto import pagedserve_pb2_grpc as pb_grpc

API_KEY = SERVED_API_KEY
APP = SERVED_TINY_CPU
PROMPT = "The quick brown fox"
METADATA = (("application", APP), ("authorization", f"Bearer {API_KEY}"))
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def app(shared_app):
    return shared_app(APP, served_tiny_cpu())


@pytest.fixture(scope="module")
def stub(app):
    with grpc.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        yield pb_grpc.GenerationStub(channel)


def _http_completion(app, **body) -> dict:
    response = httpx.post(f"{app.proxy}/v1/completions",
                          json={"model": "tiny-llama", **body},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(stub, request: pb.GenerateRequest, metadata=METADATA) -> list[pb.GenerateReply]:
    return list(stub.GenerateStream(request, metadata=metadata, timeout=TIMEOUT_S))


def test_generate_equals_http_greedy(app, stub):
    http = _http_completion(app, prompt=PROMPT, max_tokens=12, temperature=0)
    reply = stub.Generate(pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                             temperature=0),
                          metadata=METADATA, timeout=TIMEOUT_S)
    [choice] = reply.choices
    assert choice.text == http["choices"][0]["text"]
    assert len(choice.token_ids) == 12 and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == 12
    assert reply.id


def test_prompt_token_ids_equal_http_token_prompt(app, stub):
    ids = [5, 17, 42, 99]
    http = _http_completion(app, prompt=ids, max_tokens=6, temperature=0)
    reply = stub.Generate(pb.GenerateRequest(model="tiny-llama",
                                             prompt_token_ids=pb.TokenIds(token_ids=ids),
                                             max_tokens=6, temperature=0),
                          metadata=METADATA, timeout=TIMEOUT_S)
    assert reply.choices[0].text == http["choices"][0]["text"]
    assert reply.usage.prompt_tokens == len(ids)


def test_stream_concatenates_to_the_unary_reply(stub):
    request = pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=10, temperature=0)
    whole = stub.Generate(request, metadata=METADATA, timeout=TIMEOUT_S).choices[0]
    messages = _stream(stub, request)
    assert len(messages) > 1
    assert "".join(m.choices[0].text for m in messages if m.choices) == whole.text
    assert [t for m in messages for c in m.choices for t in c.token_ids] == list(whole.token_ids)
    last = messages[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == 10 and last.usage.prompt_tokens > 0
    assert all(not c.finish_reason for m in messages[:-1] for c in m.choices)
    assert not any(m.HasField("usage") for m in messages[:-1])
    assert len({m.id for m in messages}) == 1


def test_n_seed_stop_and_logprobs(stub):
    request = pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=5, n=2,
                                 temperature=1.0, seed=7, logprobs=2)
    reply = stub.Generate(request, metadata=METADATA, timeout=TIMEOUT_S)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert [entry.token_id for entry in choice.logprobs] == list(choice.token_ids)
        assert all(entry.token_id in entry.top_logprobs and 1 <= len(entry.top_logprobs) <= 3
                   for entry in choice.logprobs)
    again = stub.Generate(request, metadata=METADATA, timeout=TIMEOUT_S)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    # A stop string from the greedy text ends the completion before it, streamed or not.
    greedy = stub.Generate(pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                              temperature=0),
                           metadata=METADATA, timeout=TIMEOUT_S).choices[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                 temperature=0, stop=[stop])
    unary = stub.Generate(stopped, metadata=METADATA, timeout=TIMEOUT_S).choices[0]
    assert unary.finish_reason == "stop" and greedy.startswith(unary.text)
    assert stop not in unary.text
    streamed = "".join(m.choices[0].text for m in _stream(stub, stopped) if m.choices)
    assert streamed == unary.text


GOOD = dict(model="tiny-llama", prompt="Hello", max_tokens=4, ignore_eos=True)  # 4 tokens, always
# (request fields, metadata, status code, words the details must hold)
BAD_REQUESTS = [
    ({**GOOD, "model": "gpt-9"}, METADATA, grpc.StatusCode.NOT_FOUND, "gpt-9"),
    ({**GOOD, "max_tokens": 5000}, METADATA, grpc.StatusCode.INVALID_ARGUMENT, "5000"),
    ({**GOOD, "max_tokens": 0}, METADATA, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({**GOOD, "temperature": -0.5}, METADATA, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({**GOOD, "stop": [f"s{i}" for i in range(65)]}, METADATA, grpc.StatusCode.INVALID_ARGUMENT,
     "at most 64 stop sequences"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, METADATA,
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({**GOOD, "structured_outputs": pb.StructuredOutputs(regex="(ab")},
     METADATA, grpc.StatusCode.INVALID_ARGUMENT, "structured_outputs.regex does not compile"),
    ({**GOOD, "allowed_token_ids": [10**6]}, METADATA, grpc.StatusCode.INVALID_ARGUMENT,
     "allowed_token_ids"),
    (GOOD, METADATA[:1], grpc.StatusCode.UNAUTHENTICATED, "API key"),
    (GOOD, (METADATA[0], ("authorization", "Bearer wrong")), grpc.StatusCode.UNAUTHENTICATED,
     "API key"),
]


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("fields, metadata, code, words", BAD_REQUESTS,
                         ids=[f"{i}-{c.name}-{w}" for i, (_, _, c, w) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_a_status(stub, rpc, fields, metadata, code, words):
    request = pb.GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "Generate":
            stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S)
        else:
            _stream(stub, request, metadata=metadata)
    assert caught.value.code() == code, caught.value.details()
    assert words in caught.value.details()


def test_structured_outputs_and_logits_controls(stub):
    """The constraint and the controls of /v1/completions, in the gRPC message's shape."""
    pytest.importorskip("xgrammar")
    choice = pb.StructuredOutputs(choice=pb.Choices(choices=["sunny", "rainy"]))
    for seed in range(3):
        request = pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=10, seed=seed,
                                     structured_outputs=choice)
        reply = stub.Generate(request, metadata=METADATA, timeout=TIMEOUT_S).choices[0]
        assert reply.text in ("sunny", "rainy") and reply.finish_reason == "stop"
        streamed = "".join(m.choices[0].text for m in _stream(stub, request) if m.choices)
        assert streamed == reply.text
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                         "required": ["ok"], "additionalProperties": False})
    reply = stub.Generate(pb.GenerateRequest(
        model="tiny-llama", prompt=PROMPT, max_tokens=20,
        structured_outputs=pb.StructuredOutputs(json=schema)), metadata=METADATA,
        timeout=TIMEOUT_S).choices[0]
    assert json.loads(reply.text) in ({"ok": True}, {"ok": False})
    # logit_bias +100 on one token, and min_tokens with ignore_eos off: that token only.
    token = stub.Generate(pb.GenerateRequest(model="tiny-llama", prompt=PROMPT, max_tokens=1,
                                             temperature=0), metadata=METADATA,
                          timeout=TIMEOUT_S).choices[0].token_ids[0] + 1
    biased = stub.Generate(pb.GenerateRequest(
        model="tiny-llama", prompt=PROMPT, max_tokens=5, min_tokens=5, seed=1,
        logit_bias={token: 100.0}), metadata=METADATA, timeout=TIMEOUT_S).choices[0]
    assert list(biased.token_ids) == [token] * 5
    allowed = stub.Generate(pb.GenerateRequest(
        model="tiny-llama", prompt=PROMPT, max_tokens=6, min_tokens=6, seed=2,
        allowed_token_ids=[token, token + 1]), metadata=METADATA, timeout=TIMEOUT_S).choices[0]
    assert set(allowed.token_ids) <= {token, token + 1} and len(allowed.token_ids) == 6


def test_still_serves_after_bad_requests(stub):
    reply = stub.Generate(pb.GenerateRequest(**GOOD), metadata=METADATA, timeout=TIMEOUT_S)
    assert reply.usage.completion_tokens == 4


# -- without Ray -----------------------------------------------------------------


def test_status_codes_of_the_http_errors():
    assert status_code(errors.bad_request("n: too big", "n")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(errors.not_found_model("x", ["y"])) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.unauthorized()) == grpc.StatusCode.UNAUTHENTICATED
    assert status_code(errors.overloaded(9, 8, 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A dead engine or replica says when to retry too, but it is unavailable, not exhausted.
    for code in ("engine_dead", "replica_unavailable"):
        down = errors.retry_later("the engine stopped", 1, code=code)
        assert status_code(down) == grpc.StatusCode.UNAVAILABLE


def test_request_fields_hold_only_what_the_client_set():
    assert request_fields(pb.GenerateRequest(model="m", prompt="hi")) == {"model": "m",
                                                                          "prompt": "hi"}
    fields = request_fields(pb.GenerateRequest(
        model="m", prompt_token_ids=pb.TokenIds(token_ids=[3, 4]), temperature=0.0, n=2,
        stop=["x"], seed=0, logprobs=0))
    # Explicit zeros of `optional` fields are kept: temperature 0 is greedy, not the default.
    assert fields == {"model": "m", "prompt": [3, 4], "temperature": 0.0, "n": 2,
                      "stop": ["x"], "seed": 0, "logprobs": 0}
    request = validate_request(protocol.CompletionRequest, fields)
    assert request.sampling_params(100).temperature == 0.0
    fields = request_fields(pb.GenerateRequest(
        model="m", prompt="hi", structured_outputs=pb.StructuredOutputs(
            choice=pb.Choices(choices=["a", "b"])), logit_bias={5: -100.0}, min_tokens=2,
        allowed_token_ids=[5, 6], bad_words=["no"]))
    assert fields == {"model": "m", "prompt": "hi", "structured_outputs": {"choice": ["a", "b"]},
                      "logit_bias": {"5": -100.0}, "min_tokens": 2,
                      "allowed_token_ids": [5, 6], "bad_words": ["no"]}
    params = validate_request(protocol.CompletionRequest, fields).sampling_params(100)
    assert params.structured_outputs.choice == ("a", "b")
    assert params.min_tokens == 2 and params.bad_words == ("no",)
    assert request_fields(pb.GenerateRequest(
        model="m", prompt="x", structured_outputs=pb.StructuredOutputs(json_object=True)))[
        "structured_outputs"] == {"json_object": True}
