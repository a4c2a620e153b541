"""Tool calling's pieces without a server: the parsers of each model family's format,
read whole and as a stream (which must agree to the byte, however the text is cut),
the schema that "required" and a named function compile to, the request rules, and
the history through a chat template that renders tool calls.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.chat_template import render_chat
from pagedserve.cluster.chat_protocol import ChatCompletionRequest
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.parsing import parse_request
from pagedserve.cluster.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedParser,
    RequiredParser,
    value_end,
)
from pagedserve.cluster.tools import ToolCalling, forced_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
NOOP = {"type": "function", "function": {"name": "noop"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]

# (parser, output text, expected content, expected calls as (name, arguments))
CASES = [
    (HermesParser(), 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": '
                     '{"city": "Paris", "days": [1, {"x": "}"}]}}\n</tool_call>\n'
                     '<tool_call>{"arguments": {}, "name": "noop"}</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris", "days": [1, {"x": "}"}]}'),
                       ("noop", "{}")]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "f", "parameters": {"a": "x}\\"y"}}; '
                         '{"name": "g", "parameters": {"n": -1.5e3}}',
     None, [("f", '{"a": "x}\\"y"}'), ("g", '{"n": -1.5e3}')]),
    (Llama3JsonParser(), '{"name": "f", "arguments": {"a": true}}', None, [("f", '{"a": true}')]),
    (MistralParser(), 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, '
                      '{"name": "g", "arguments": {"b": null}}]',
     "ok ", [("f", '{"a": 1}'), ("g", '{"b": null}')]),
    (MistralParser(), '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{"b": "[ARGS]"}',
     None, [("f", '{"a": 1}'), ("g", '{"b": "[ARGS]"}')]),
    (RequiredParser(), '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", '
                       '"parameters": {}}]', None, [("f", '{"a": 1}'), ("g", "{}")]),
    (NamedParser("f"), '{"a": [1, 2]}', None, [("f", '{"a": [1, 2]}')]),
]

# Outputs with no call in them: all of it is content, whole or streamed.
CONTENT = [
    (HermesParser(), "The answer is 4 <tool"),
    (HermesParser(), "Broken <tool_call>{name: f}</tool_call>"),
    (Llama3JsonParser(), "Hello {\"name\": \"f\"}"),
    (Llama3JsonParser(), '{"answer": 42}'),
    (Llama3JsonParser(), "   "),
    (MistralParser(), "plain [TOOL_CA"),
]


def _streamed(calling: ToolCalling, text: str, cuts: list[int]) -> tuple[str, list, bool]:
    """Content, calls (name, arguments) and whether calls were made, from the text sent in
    pieces ending at `cuts`, as the ingress streams it."""
    stream, content, calls = calling.stream(), "", {}
    bounds = [0, *cuts, len(text)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        delta = stream.update(text[start:end], end == len(text))
        content += delta.get("content", "")
        for entry in delta.get("tool_calls", []):
            call = calls.setdefault(entry["index"], {"name": None, "arguments": ""})
            if "id" in entry:
                assert call["name"] is None and entry["type"] == "function", entry
                call["name"] = entry["function"]["name"]
            call["arguments"] += entry.get("function", {}).get("arguments", "")
    return content, [(call["name"], call["arguments"]) for call in calls.values()], stream.called


def _cuts(text: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))


@pytest.mark.parametrize("parser, text, content, calls", CASES,
                         ids=[f"{case[0].name}-{i}" for i, case in enumerate(CASES)])
def test_whole_and_streamed_outputs_give_the_same_calls(parser, text, content, calls):
    calling = ToolCalling(parser)
    message, reason = calling.message(text, "stop")
    assert reason == "tool_calls"
    assert message["content"] == content
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == calls
    assert len({c["id"] for c in message["tool_calls"]}) == len(calls)
    for _, arguments in calls:
        json.loads(arguments)
    # One character at a time, and in random pieces: the same content and calls.
    for cuts in [list(range(1, len(text))), *(_cuts(text, seed) for seed in range(20))]:
        assert _streamed(calling, text, cuts) == (content or "", calls, True)


@pytest.mark.parametrize("parser, text", CONTENT, ids=[case[0].name for case in CONTENT])
def test_outputs_without_calls_are_content_whole_and_streamed(parser, text):
    calling = ToolCalling(parser)
    assert calling.message(text, "length") == ({"role": "assistant", "content": text}, "length")
    for cuts in [list(range(1, len(text))), *(_cuts(text, seed) for seed in range(5))]:
        assert _streamed(calling, text, cuts) == (text, [], False)


def test_a_partial_marker_is_held_back_until_it_is_known():
    stream = ToolCalling(HermesParser()).stream()
    assert stream.update("Sure <tool_", False) == {"content": "Sure "}
    assert stream.update("cal", False) == {}
    assert stream.update("l>{\"na", False) == {}
    delta = stream.update('me": "noop", "arguments": {"a"', False)
    entry, = delta["tool_calls"]
    assert entry["function"] == {"name": "noop", "arguments": '{"a"'} and "content" not in delta
    assert stream.update(": 1}}", True)["tool_calls"] == [
        {"index": 0, "function": {"arguments": ": 1}"}}]


def test_arguments_before_the_name_wait_for_it():
    stream = ToolCalling(HermesParser()).stream()
    assert stream.update('<tool_call>{"arguments": {"a": 1}, ', False) == {}
    entry, = stream.update('"name": "f"}', True)["tool_calls"]
    assert entry["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = CASES[0][1]
    calling = ToolCalling(HermesParser(), parallel=False)
    message, _ = calling.message(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert [name for name, _ in _streamed(calling, text, [5, 30, 80])[1]] == ["get_weather"]


def test_a_call_cut_off_by_the_length_limit_is_content_with_finish_reason_length():
    text = '<tool_call>{"name": "f", "arguments": {"a": '
    assert ToolCalling(HermesParser()).message(text, "length") == (
        {"role": "assistant", "content": text}, "length")
    stream = ToolCalling(HermesParser()).stream()
    assert stream.update(text, True)["tool_calls"][0]["function"]["name"] == "f"
    # A stream cannot take back what it sent: the call's start went out as a call.
    assert ToolCalling(NamedParser("f")).message('{"a": ', "length") == (
        {"role": "assistant", "content": '{"a": '}, "length")


def test_value_end_finds_where_json_values_stop():
    assert value_end('{"a": "}"} tail', 0) == 10
    assert value_end('"x\\"y" ,', 0) == 6
    assert value_end("12.5,", 0) == 4
    assert value_end("12.5", 0) is None  # more digits may follow
    assert value_end('[1, {"b": [', 0) is None


# ---------------------------------------------------------------------------- the schema


def test_the_required_schema_admits_calls_of_the_tools_only():
    tools = _chat(tools=[WEATHER, NOOP]).tools
    schema = forced_schema(tools, "required", parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Rome"}},
                         {"name": "noop", "parameters": {}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {"town": "Rome"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = forced_schema(tools, "required", parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "noop", "parameters": {}}] * 2, single)


def test_forced_choices_become_a_json_constraint_that_xgrammar_enforces():
    pytest.importorskip("xgrammar")
    from pagedserve.engine.grammar import GrammarCompiler, Matcher

    named = _chat(tools=[WEATHER, NOOP], tool_choice={"type": "function",
                                                     "function": {"name": "get_weather"}})
    assert named.sampling_params(room=50).structured_outputs.json == json.dumps(
        WEATHER["function"]["parameters"])
    required = _chat(tools=[WEATHER, NOOP], tool_choice="required", parallel_tool_calls=False)
    params = required.sampling_params(room=50).structured_outputs
    assert json.loads(params.json)["maxItems"] == 1
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer())
    compiler = GrammarCompiler(tokenizer, 128)  # the ids are the characters' codes
    try:
        compiled = compiler.compile(params)
        good = '[{"name": "get_weather", "parameters": {"city": "Rome"}}]'
        matcher = Matcher(compiled)
        assert all(matcher.accept(tokenizer.convert_tokens_to_ids(char)) for char in good)
        matcher = Matcher(compiled)
        accepted = [matcher.accept(tokenizer.convert_tokens_to_ids(char))
                    for char in '[{"name": "other"']
        assert not all(accepted)  # only the tools' names
    finally:
        compiler.shutdown()
    assert _chat(tools=[WEATHER], tool_choice="auto").sampling_params(
        room=50).structured_outputs is None
    assert _chat(tools=[WEATHER]).effective_tool_choice == "auto"


# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("fields, param, fragment", [
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools (get_weather)"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "must be unique"),
    ({"tools": []}, "tools", "at least 1"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]},
     "tools[0].function.name", "should match pattern"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined with tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "use_beam_search": True, "n": 2},
     "tool_choice", "not supported with use_beam_search"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "messages[0].tool_call_id",
     "is required for role 'tool'"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls", "only assistant messages"),
])
def test_bad_tool_requests_are_400s_naming_the_field(fields, param, fragment):
    with pytest.raises(OpenAIError) as raised:
        _chat(**fields)
    assert raised.value.status_code == 400 and raised.value.param == param
    assert fragment in raised.value.message, raised.value.message


def test_auto_without_a_configured_parser_is_a_400_on_tool_choice():
    req = _chat(tools=[WEATHER])
    with pytest.raises(OpenAIError) as raised:
        ToolCalling.of(req.tools, req.effective_tool_choice, None, None)
    assert raised.value.param == "tool_choice" and "serving.tool_call_parser" in \
        raised.value.message
    assert ToolCalling.of(req.tools, "none", None, None) is None
    assert isinstance(ToolCalling.of(req.tools, "auto", None, "mistral").parser, MistralParser)


# A template that renders tools and calls as Qwen2.5's does (tojson on the arguments).
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>"
    "{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call id={{ c.id }}>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}</{{ m.role }}>{% endfor %}")


def test_history_with_calls_and_results_goes_through_the_template():
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    req = _chat(messages=messages, tools=[WEATHER, NOOP])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer())
    ids = render_chat(tokenizer, req.conversation(), TOOL_TEMPLATE, tools=req.template_tools())
    text = "".join(tokenizer.convert_ids_to_tokens(ids))
    assert text.startswith("<tools>get_weather;noop;</tools><user>Weather in Paris?</user>")
    assert ('<assistant><call id=call_1>get_weather{"city": "Paris"}</call></assistant>'
            "<tool>18C[call_1]</tool>") in text


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(32, 127)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tokenizer


def _chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", USER)
    return parse_request(ChatCompletionRequest, json.dumps({"model": "m", **fields}).encode())
