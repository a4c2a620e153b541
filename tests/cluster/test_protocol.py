"""The OpenAI wire format, inbound: request validation, SamplingParams conversion, errors.

Response shapes and streaming are in test_responses.py.
"""

from __future__ import annotations

import json

import pytest

from pagedserve.cluster.chat_protocol import ChatCompletionRequest
from pagedserve.cluster.errors import (
    OpenAIError,
    bad_request,
    not_found_model,
    overloaded,
    too_large,
    unauthorized,
)
from pagedserve.cluster.parsing import parse_request
from pagedserve.cluster.protocol import CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, body(model="m", prompt="hi", **fields))


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, body(model="m", messages=USER, **fields))


# ---------------------------------------------------------------------------- requests


def test_completion_defaults():
    request = completion()
    assert (request.max_tokens, request.temperature, request.top_p, request.n) == (16, 1.0, 1.0, 1)
    assert request.best_of is None and request.stop is None and request.logprobs is None
    assert not request.echo and not request.stream and request.stream_options is None
    assert (request.top_k, request.min_p, request.repetition_penalty) == (-1, 0.0, 1.0)
    assert request.skip_special_tokens and not request.use_beam_search
    params = request.sampling_params(room=100)
    assert (params.max_tokens, params.top_k, params.n, params.best_of) == (16, 0, 1, 1)
    assert params.logprobs is None and params.stop == () and params.temperature == 1.0


def test_chat_defaults():
    request = chat()
    assert request.max_tokens is None and request.max_completion_tokens is None
    assert not request.logprobs and request.top_logprobs is None
    assert request.num_top_logprobs is None
    params = request.sampling_params(room=77)
    assert params.max_tokens == 77 and params.logprobs is None and params.top_k == 0


C, CH = CompletionRequest, ChatCompletionRequest
BAD_BODIES = [
    # (request class, body, param, fragment of the message)
    (C, b'{"model": "m", "prompt": ', None, "not valid JSON"),
    (C, b"[1, 2]", None, "must be a JSON object"),
    (C, b'{"prompt": "hi"}', "model", "Field required"),
    (C, body(model="m", prompt="hi", max_tokens="5"), "max_tokens", "valid integer"),
    (C, body(model="m", prompt="hi", temperature="hot"), "temperature", "valid number"),
    (C, body(model="m", prompt="hi", stream=1), "stream", "valid boolean"),
    (C, body(model="m", prompt="hi", max_tokens=-5), "max_tokens",
     "max_tokens: Input should be greater than or equal to 0 (got -5)"),
    (C, body(model="m", prompt="hi", max_tokens=0), "max_tokens", "0 is allowed with echo=true"),
    (C, body(model="m", prompt="hi", n=0), "n", "greater than or equal to 1"),
    (C, body(model="m", prompt="hi", n=129), "n", "less than or equal to 128"),
    (C, body(model="m", prompt="hi", n=3, best_of=2), "best_of", "at least n=3 (got 2)"),
    (C, body(model="m", prompt="hi", logprobs=21), "logprobs", "less than or equal to 20"),
    (C, body(model="m", prompt="hi", temperature=3), "temperature", "less than or equal to 2"),
    (C, body(model="m", prompt="hi", top_p=0), "top_p", "greater than 0"),
    (C, body(model="m", prompt="hi", top_k=-2), "top_k", "greater than or equal to -1"),
    (C, body(model="m", prompt="hi", presence_penalty=2.5), "presence_penalty", "2"),
    (C, body(model="m", prompt="hi", stop=[f"s{i}" for i in range(65)]), "stop",
     "at most 64 stop sequences are allowed (65 given; serving.max_stop_sequences"),
    (C, body(model="m", prompt="hi", stop=""), "stop", "non-empty"),
    (C, body(model="m", prompt="hi", stop=5), "stop", "string or a list of strings"),
    (C, body(model="m", prompt="hi", stream_options={"include_usage": True}),
     "stream_options", "only allowed when stream=true"),
    (C, body(model="m", prompt="hi", stream=True, stream_options={"foo": 1}),
     "stream_options.foo", "Unrecognized request argument supplied: stream_options.foo"),
    (C, body(model="m", prompt="hi", foo=1), "foo", "Unrecognized request argument supplied: foo"),
    (C, body(model="m", prompt=[]), "prompt", "must not be empty"),
    (C, body(model="m", prompt=[[1, 2], []]), "prompt", "must not be empty"),
    (C, body(model="m", prompt=[1, -2, 3]), "prompt", "token ids must be >= 0"),
    (C, body(model="m", prompt=["a", 1]), "prompt", "list of token ids"),
    (C, body(model="m", prompt="hi", stream=True, prompt_logprobs=1), "prompt_logprobs",
     "not available with stream=true"),
    (C, body(model="m", prompt="hi", echo=True, logprobs=1, prompt_logprobs=2),
     "prompt_logprobs", "must equal logprobs=1"),
    (C, body(model="m", prompt="hi", spaces_between_special_tokens=False),
     "spaces_between_special_tokens", "only true is supported (got false)"),
    (C, body(model="m", prompt="hi", priority=1), "priority", "only 0 is supported"),
    (C, body(model="m", prompt="hi", truncate_prompt_tokens=0), "truncate_prompt_tokens",
     "greater than or equal to 1"),
    (C, body(model="m", prompt="hi", stream=True, stream_options={"continuous_usage_stats": 1}),
     "stream_options.continuous_usage_stats", "valid boolean"),
    (C, body(model="m", prompt="hi", stream=True, use_beam_search=True), "use_beam_search",
     "cannot be streamed"),
    (C, body(model="m", prompt="hi", stream=True, best_of=2), "best_of", "equal n=1"),
    (C, body(model="m", prompt="hi", stop_token_ids=[1, -1]), "stop_token_ids[1]",
     "greater than or equal to 0"),
    (C, body(model="m", prompt="hi", seed=2**63), "seed", "less than"),
    (CH, body(model="m", messages=[]), "messages", "at least 1 item"),
    (CH, body(model="m", messages=[{"role": "bot", "content": "x"}]), "messages[0].role",
     "'system', 'user', 'assistant', 'developer' or 'tool' (got \"bot\")"),
    (CH, body(model="m", messages=[*USER, {"role": "user"}]), "messages[1].content",
     "required for role 'user'"),
    (CH, body(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), "messages[0].content",
     "only text is supported"),
    (CH, body(model="m", messages=USER, top_logprobs=2), "top_logprobs", "requires logprobs=true"),
    (CH, body(model="m", messages=USER, logprobs=True, top_logprobs=21), "top_logprobs", "20"),
    (CH, body(model="m", messages=USER, max_tokens=5, max_completion_tokens=6),
     "max_completion_tokens", "conflicts with max_tokens=5"),
    (CH, body(model="m", messages=USER, logprobs=3), "logprobs", "valid boolean"),
    (CH, body(model="m", messages=USER, tools=[]), "tools", "at least 1 item"),
    (CH, body(model="m", messages=USER, functions=[]), "functions",
     "Unrecognized request argument"),
    (CH, body(model="m", messages=USER, continue_final_message=True), "continue_final_message",
     "add_generation_prompt=true"),
    # JSON escapes can spell lone surrogates: not text, refused wherever they are.
    (C, b'{"model": "m", "prompt": "a\\ud800"}', "prompt", "lone surrogate"),
    (C, b'{"model": "m", "prompt": "hi", "stop": ["ok", "\\udfff"]}', "stop[1]",
     "not valid Unicode"),
    (CH, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages[0].content", "lone surrogate"),
    (C, b'{"model": "m", "prompt": "hi", "\\ud800": 1}', "body", "not valid Unicode"),
    (C, b'{"model": "m", "prompt": "a\\uDC80"}', "prompt", "lone surrogate"),
    # Or raw, a surrogate encoded as UTF-8 (json.loads decodes with surrogatepass).
    (C, b'{"model": "m", "prompt": "a\xed\xa0\x80"}', "prompt", "lone surrogate"),
]


@pytest.mark.parametrize("model_cls, raw, param, fragment", BAD_BODIES,
                         ids=[f"{i}-{case[2]}" for i, case in enumerate(BAD_BODIES)])
def test_bad_bodies_are_400_naming_the_field(model_cls, raw, param, fragment):
    with pytest.raises(OpenAIError) as info:
        parse_request(model_cls, raw)
    error = info.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param == param
    assert fragment in error.message
    if param is not None:
        assert error.message.startswith(param) or param in error.message
    assert error.body() == {"error": {"message": error.message, "type": error.type,
                                      "param": param, "code": None}}


def test_equal_max_tokens_and_max_completion_tokens_are_accepted():
    request = chat(max_tokens=5, max_completion_tokens=5)
    assert request.sampling_params(100).max_tokens == 5
    assert chat(max_completion_tokens=7).sampling_params(100).max_tokens == 7
    assert chat(max_tokens=6).max_tokens_requested() == 6
    assert chat(max_completion_tokens=7).max_tokens_requested() == 7
    assert completion(max_tokens=None).max_tokens_requested() is None


@pytest.mark.parametrize("top_k, expected", [(-1, 0), (0, 0), (5, 5)])
def test_top_k_disabled_values_become_zero(top_k, expected):
    assert completion(top_k=top_k).sampling_params(100).top_k == expected


def test_max_tokens_against_the_context_limit():
    """The rule lives in engine.capacity.context_room; the request names its own fields."""
    from pagedserve.engine.capacity import context_room
    from pagedserve.errors import RequestError

    assert completion(max_tokens=None).sampling_params(room=40).max_tokens == 40
    assert completion(max_tokens=40).sampling_params(room=40).max_tokens == 40
    assert context_room(24, 64, 40, min_room=1) == 40
    with pytest.raises(RequestError) as info:
        context_room(24, 64, 41, min_room=1)
    assert info.value.param == "max_tokens" and "65 tokens" in info.value.message
    assert completion(max_tokens=41).param_names()[info.value.param] == "max_tokens"
    assert chat(max_completion_tokens=9).param_names()["max_tokens"] == "max_completion_tokens"
    with pytest.raises(RequestError) as info:
        context_room(64, 64, None, min_room=1)  # no room left for a new token
    assert info.value.param == "prompt_token_ids"
    assert chat().param_names()[info.value.param] == "messages"  # a chat request has no prompt
    assert completion().param_names()[info.value.param] == "prompt"
    assert context_room(64, 64) == 0  # offline, a prompt that fills the context is served


def test_sampling_fields_are_carried_over():
    params = completion(n=2, best_of=3, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1,
                        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                        stop="###", stop_token_ids=[3, 4], ignore_eos=True, seed=11,
                        logprobs=2, skip_special_tokens=False).sampling_params(100)
    assert (params.n, params.best_of, params.temperature, params.top_p) == (2, 3, 0.5, 0.9)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (7, 0.1, 1.2)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.stop == ("###",) and params.stop_token_ids == (3, 4)
    assert params.ignore_eos and params.seed == 11 and params.logprobs == 2
    assert not params.skip_special_tokens


def test_beam_search_fields(caplog):
    with caplog.at_level("WARNING", logger="pagedserve"):
        params = completion(use_beam_search=True, best_of=4, n=2, length_penalty=0.8,
                            max_tokens=8).sampling_params(100)
    assert params.use_beam_search and (params.best_of, params.n) == (4, 2)
    assert params.length_penalty == 0.8
    assert params.temperature == 0.0 and not caplog.records  # nothing set, nothing ignored
    # Sampling knobs the client set are ignored with a warning, as SamplingParams does.
    with caplog.at_level("WARNING", logger="pagedserve"):
        params = completion(use_beam_search=True, best_of=2, temperature=0.7, top_k=5,
                            top_p=0.9, min_p=0.1).sampling_params(100)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.0, 0, 1.0, 0.0)
    [record] = caplog.records
    assert all(name in record.getMessage() for name in ("temperature", "top_k", "top_p", "min_p"))
    with pytest.raises(OpenAIError) as info:
        completion(use_beam_search=True, presence_penalty=0.5).sampling_params(100)
    assert info.value.status_code == 400 and info.value.param == "presence_penalty"
    assert "use_beam_search" in info.value.message
    with pytest.raises(OpenAIError, match="use_beam_search") as info:
        parse_request(CompletionRequest, body(model="m", prompt="x", use_beam_search=True,
                                              logprobs=1))
    assert info.value.param == "logprobs"


def test_chat_logprobs_become_sampling_logprobs():
    assert chat(logprobs=True).sampling_params(10).logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).sampling_params(10).logprobs == 3
    assert chat(logprobs=True, top_logprobs=3).num_top_logprobs == 3


def test_surrogate_pairs_are_text():
    """Only a lone surrogate is refused: a pair, escaped, spells one character."""
    emoji = parse_request(C, b'{"model": "m", "prompt": "\\ud83d\\ude00"}')
    assert emoji.prompt == "\U0001F600"


def test_prompts_one_entry_per_prompt():
    assert completion().prompts() == ["hi"]
    assert parse_request(C, body(model="m", prompt=["a", "b"])).prompts() == ["a", "b"]
    assert parse_request(C, body(model="m", prompt=[1, 2, 3])).prompts() == [[1, 2, 3]]
    assert parse_request(C, body(model="m", prompt=[[1], [2, 3]])).prompts() == [[1], [2, 3]]
    assert parse_request(C, body(model="m", prompt="")).prompts() == [""]


def test_conversation_joins_text_parts():
    request = parse_request(ChatCompletionRequest, body(model="m", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}], "name": "ann"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]))
    assert request.conversation() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\ntwo", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


# ---------------------------------------------------------------------------- errors


def test_error_helpers():
    error = not_found_model("gpt-9", ["tiny", "small"])
    assert (error.status_code, error.code, error.param) == (404, "model_not_found", "model")
    assert "gpt-9" in error.message and "tiny, small" in error.message
    error = unauthorized()
    assert (error.status_code, error.type) == (401, "authentication_error")
    assert "Authorization: Bearer <key>" in error.message
    error = too_large(2_000_000, 1_000_000)
    assert error.status_code == 413 and "2000000" in error.message and "1000000" in error.message
    error = overloaded(waiting=300, limit=256, retry_after_s=2)
    assert (error.status_code, error.type, error.headers) == (503, "server_error",
                                                              {"Retry-After": "2"})
    assert "300" in error.message and "256" in error.message
    error = bad_request("nope", param="n")
    assert str(error) == "nope" and error.body()["error"]["param"] == "n"


def test_logits_controls_and_constraints_reach_sampling_params():
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "logit_bias": {"12": 5.5, "3": -100},
         "min_tokens": 3, "allowed_token_ids": [1, 2, 12], "guided_regex": "[ab]+"})
    params = request.sampling_params(100)
    assert params.logit_bias == {12: 5.5, 3: -100.0} and params.min_tokens == 3
    assert params.allowed_token_ids == (1, 2, 12) and params.structured_outputs.regex == "[ab]+"
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}],
         "response_format": {"type": "text"}})
    assert chat.sampling_params(10).structured_outputs is None
