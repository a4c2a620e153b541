"""The OpenAI wire format: request validation, SamplingParams conversion, response shapes.

Responses are checked against the official `openai` client's own models, so a
shape the client could not read fails here rather than in a user's program.
"""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

from pagedserve.cluster.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    bad_request,
    not_found_model,
    overloaded,
    parse_request,
    too_large,
    unauthorized,
)
from pagedserve.cluster.responses import (
    StreamState,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    finish_reason,
    model_list,
    usage,
    usage_chunk,
)
from pagedserve.outputs import CompletionOutput, RequestOutput

CREATED = 1_700_000_000
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, body(model="m", prompt="hi", **fields))


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, body(model="m", messages=USER, **fields))


def choice(index, token_ids, text, finish=None, logprobs=None) -> CompletionOutput:
    return CompletionOutput(index=index, text=text, token_ids=token_ids, cumulative_logprob=-1.0,
                            logprobs=logprobs, finish_reason=finish)


def request_output(prompt_ids, choices, request_id="r") -> RequestOutput:
    return RequestOutput(request_id, None, prompt_ids, choices,
                         finished=all(c.finished for c in choices))


# ---------------------------------------------------------------------------- requests


def test_completion_defaults():
    request = completion()
    assert (request.max_tokens, request.temperature, request.top_p, request.n) == (16, 1.0, 1.0, 1)
    assert request.best_of is None and request.stop is None and request.logprobs is None
    assert not request.echo and not request.stream and request.stream_options is None
    assert (request.top_k, request.min_p, request.repetition_penalty) == (-1, 0.0, 1.0)
    assert request.skip_special_tokens and not request.use_beam_search
    params = request.sampling_params(max_tokens_limit=100)
    assert (params.max_tokens, params.top_k, params.n, params.best_of) == (16, 0, 1, 1)
    assert params.logprobs is None and params.stop == () and params.temperature == 1.0


def test_chat_defaults():
    request = chat()
    assert request.max_tokens is None and request.max_completion_tokens is None
    assert not request.logprobs and request.top_logprobs is None
    assert request.num_top_logprobs is None
    params = request.sampling_params(max_tokens_limit=77)
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
     "max_tokens: Input should be greater than or equal to 1 (got -5)"),
    (C, body(model="m", prompt="hi", n=0), "n", "greater than or equal to 1"),
    (C, body(model="m", prompt="hi", n=129), "n", "less than or equal to 128"),
    (C, body(model="m", prompt="hi", n=3, best_of=2), "best_of", "at least n=3 (got 2)"),
    (C, body(model="m", prompt="hi", logprobs=21), "logprobs", "less than or equal to 20"),
    (C, body(model="m", prompt="hi", temperature=3), "temperature", "less than or equal to 2"),
    (C, body(model="m", prompt="hi", top_p=0), "top_p", "greater than 0"),
    (C, body(model="m", prompt="hi", top_k=-2), "top_k", "greater than or equal to -1"),
    (C, body(model="m", prompt="hi", presence_penalty=2.5), "presence_penalty", "2"),
    (C, body(model="m", prompt="hi", stop=list("abcde")), "stop", "at most 4 stop sequences"),
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
    (C, body(model="m", prompt="hi", echo=True), "echo", "not supported"),
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
    (CH, body(model="m", messages=USER, tools=[]), "tools", "Unrecognized request argument"),
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
    assert completion(max_tokens=None).sampling_params(max_tokens_limit=40).max_tokens == 40
    assert completion(max_tokens=40).sampling_params(max_tokens_limit=40).max_tokens == 40
    with pytest.raises(OpenAIError) as info:
        completion(max_tokens=41).sampling_params(max_tokens_limit=40)
    assert info.value.param == "max_tokens" and "41" in info.value.message
    assert "40" in info.value.message
    with pytest.raises(OpenAIError) as info:
        chat(max_completion_tokens=9).sampling_params(max_tokens_limit=8)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(OpenAIError) as info:
        chat().sampling_params(max_tokens_limit=0)
    assert info.value.param == "prompt"


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


def test_beam_search_fields():
    params = completion(use_beam_search=True, best_of=4, n=2, length_penalty=0.8,
                        max_tokens=8).sampling_params(100)
    assert params.use_beam_search and (params.best_of, params.n) == (4, 2)
    assert params.length_penalty == 0.8
    # Temperature defaults to 0 for beam search; one the client set is checked.
    assert params.temperature == 0.0
    with pytest.raises(OpenAIError) as info:
        completion(use_beam_search=True, temperature=0.7).sampling_params(100)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    assert info.value.message == "temperature=0.7: must be 0 with use_beam_search=True"
    with pytest.raises(OpenAIError, match="use_beam_search") as info:
        parse_request(CompletionRequest, body(model="m", prompt="x", use_beam_search=True,
                                              logprobs=1))
    assert info.value.param == "logprobs"


def test_chat_logprobs_become_sampling_logprobs():
    assert chat(logprobs=True).sampling_params(10).logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).sampling_params(10).logprobs == 3
    assert chat(logprobs=True, top_logprobs=3).num_top_logprobs == 3


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


# ---------------------------------------------------------------------------- responses


def test_finish_reason_mapping():
    assert [finish_reason(r) for r in (None, "stop", "length", "abort")] == \
        [None, "stop", "length", "abort"]
    with pytest.raises(ValueError):
        finish_reason("eos")


def test_completion_response_two_prompts_n2(tokenizer):
    outputs = [
        request_output([1, 2, 3], [choice(1, [5, 6], "b", "length"), choice(0, [5], "a", "stop")]),
        request_output([1, 2], [choice(0, [7, 8, 9], "c", "stop"), choice(1, [7], "d", "length")]),
    ]
    response = completion_response("cmpl-1", "tiny", CREATED, outputs, tokenizer, logprobs=None)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in response["choices"]] == [
        (0, "a", "stop"), (1, "b", "length"), (2, "c", "stop"), (3, "d", "length")]
    assert all(c["logprobs"] is None for c in response["choices"])
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert (response["id"], response["object"], response["model"], response["created"]) == (
        "cmpl-1", "text_completion", "tiny", CREATED)
    Completion.model_validate(response)


def test_completion_legacy_logprobs(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    a, b = ids[0], ids[1]
    # logprobs=1: each step holds the sampled token first, then the most likely one.
    entries = [{a: -0.5}, {b: -float("inf"), a: -0.1}]
    output = request_output([0], [choice(0, [a, b], "x", "length", entries)])
    response = completion_response("c", "m", CREATED, [output], tokenizer, logprobs=1)
    logprobs = response["choices"][0]["logprobs"]
    text_a, text_b = tokenizer.decode([a]), tokenizer.decode([b])
    assert logprobs["tokens"] == [text_a, text_b]
    assert logprobs["token_logprobs"] == [-0.5, -9999.0]  # -inf is not JSON
    # The sampled token is always included, then up to `logprobs` alternatives.
    assert logprobs["top_logprobs"] == [{text_a: -0.5}, {text_b: -9999.0, text_a: -0.1}]
    assert logprobs["text_offset"] == [0, len(text_a)]
    json.dumps(response, allow_nan=False)
    Completion.model_validate(response)
    shifted = completion_logprobs(entries[1:], tokenizer, text_offset=10)
    assert shifted["text_offset"] == [10]
    assert shifted["top_logprobs"] == [{text_b: -9999.0, text_a: -0.1}]


def test_chat_response_with_top_logprobs(tokenizer):
    sampled, best, second = 40, 41, 42
    entries = [{sampled: -2.0, best: -0.2, second: -0.9}]  # sampled outside the top 2
    output = request_output([1, 2, 3, 4], [choice(0, [sampled], "x", "stop", entries)])
    response = chat_response("chatcmpl-1", "m", CREATED, output, tokenizer, top_logprobs=2)
    (only,) = response["choices"]
    assert only["message"] == {"role": "assistant", "content": "x"}
    assert only["finish_reason"] == "stop" and response["object"] == "chat.completion"
    (token,) = only["logprobs"]["content"]
    text = tokenizer.decode([sampled])
    assert (token["token"], token["logprob"], token["bytes"]) == (text, -2.0,
                                                                  list(text.encode()))
    assert [t["token"] for t in token["top_logprobs"]] == [tokenizer.decode([best]),
                                                           tokenizer.decode([second])]
    assert [t["logprob"] for t in token["top_logprobs"]] == [-0.2, -0.9]
    assert response["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    ChatCompletion.model_validate(response)
    plain = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=None)
    assert plain["choices"][0]["logprobs"] is None
    zero = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=0)
    assert zero["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_response_n2_usage(tokenizer):
    output = request_output([1, 2], [choice(1, [3, 4, 5], "y", "length"),
                                     choice(0, [3], "x", "stop")])
    response = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=None)
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert response["usage"]["completion_tokens"] == 4 and response["usage"]["total_tokens"] == 6


def test_chunks_and_lists_match_the_openai_client():
    first = chat_chunk("c", "m", CREATED, 0, {"role": "assistant", "content": ""}, None)
    last = chat_chunk("c", "m", CREATED, 0, {}, "stop")
    for chunk in (first, last):
        assert chunk["object"] == "chat.completion.chunk"
        ChatCompletionChunk.model_validate(chunk)
    text = completion_chunk("c", "m", CREATED, 3, "lo", None)
    assert text["choices"] == [{"index": 3, "text": "lo", "logprobs": None, "finish_reason": None}]
    # The client's Completion type omits the null finish_reason of a stream's chunks.
    Completion.model_validate(completion_chunk("c", "m", CREATED, 3, "", "stop"))
    final = usage_chunk("c", "m", CREATED, "chat.completion.chunk", usage(3, 4))
    assert final["choices"] == [] and final["usage"]["total_tokens"] == 7
    assert ChatCompletionChunk.model_validate(final).usage.completion_tokens == 4
    models = model_list(["tiny", "small"], CREATED)
    assert models["object"] == "list"
    assert [Model.model_validate(m).id for m in models["data"]] == ["tiny", "small"]


# ---------------------------------------------------------------------------- streaming


def test_stream_state_deltas_over_three_steps():
    state = StreamState()
    lp = [{5: -0.1}, {6: -0.2}, {7: -0.3}, {8: -0.4}]
    step1 = request_output([1], [choice(0, [5], "He", logprobs=lp[:1]),
                                 choice(1, [5], "", logprobs=lp[:1])])
    step2 = request_output([1], [choice(0, [5, 6], "Hello", logprobs=lp[:2]),
                                 choice(1, [5, 6], "Hi", "stop", lp[:2])])
    step3 = request_output([1], [choice(0, [5, 6, 7], "Hello!", "length", lp[:3]),
                                 choice(1, [5, 6], "Hi", "stop", lp[:2])])
    assert state.deltas(step1) == [(0, "He", lp[:1], None), (1, "", lp[:1], None)]
    assert state.deltas(step2) == [(0, "llo", lp[1:2], None), (1, "Hi", lp[1:2], "stop")]
    assert (state.text_offset(0), state.text_offset(1)) == (2, 0)
    assert state.deltas(step3) == [(0, "!", lp[2:3], "length")]  # choice 1 is done
    assert state.text_offset(0) == 5
    assert state.deltas(step3) == []


def test_stream_state_without_logprobs_skips_empty_updates():
    state = StreamState()
    assert state.deltas(request_output([1], [choice(0, [5], "")])) == []
    assert state.deltas(request_output([1], [choice(0, [5, 6], "ab")])) == [(0, "ab", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6, 7], "ab", "abort")])) == [
        (0, "", None, "abort")]


def test_stream_state_holds_back_a_possible_stop_string():
    # The engine cuts "###" off once it completes: "ab#" must not be sent as it arrives.
    state = StreamState(stop=["###"])
    assert state.deltas(request_output([1], [choice(0, [5], "ab#")])) == [(0, "a", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6], "ab##")])) == [(0, "b", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6, 7], "ab", "stop")])) == [
        (0, "", None, "stop")]


def test_stream_texts_add_up_to_the_final_text():
    final = "The quick brown fox"
    state = StreamState(stop=["STOP"])
    sent = ""
    for end in range(1, len(final) + 1):
        done = end == len(final)
        out = request_output([1], [choice(0, list(range(end)), final[:end],
                                          "length" if done else None)])
        sent += "".join(text for _, text, _, _ in state.deltas(out))
    assert sent == final
