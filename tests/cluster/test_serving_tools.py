"""Tool calling through the OpenAI-compatible server, judged by the official `openai`
client: `tool_choice` "required" and a named function (enforced by the grammar, so
every call parses and validates against its tool's schema, even from the session's
random model), "auto" read by the configured hermes parser, streamed and not, the
SDK's own stream accumulator and `parse()` with a pydantic tool, and a history with
calls and their results sent back.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "description": "The weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}


class Lookup(BaseModel):
    """Look up a word."""

    word: str = Field(max_length=10)
    limit: int = Field(ge=1, le=9)


@pytest.fixture(scope="module")
def server(shared_app):
    return shared_app(SERVED_TINY_CPU, served_tiny_cpu()).direct


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0)


def _check_calls(message, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_calls_that_validate(client, seed):
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=600, seed=seed, temperature=1.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message, {"get_weather", "get_time"})


def test_a_named_function_gives_its_call(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120, n=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
        _check_calls(choice.message, {"get_weather"})


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        message = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, max_tokens=120, seed=seed).choices[0].message
        assert len(message.tool_calls) == 1


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_match_the_sdks_accumulator(client, tool_choice):
    """The SDK's stream helper adds the deltas up; the first delta of a call has its id
    and name, the rest argument fragments."""
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                        tool_choice=tool_choice, max_tokens=120,
                                        seed=4) as stream:
        deltas = [event.chunk.choices[0].delta for event in stream
                  if event.type == "chunk" and event.chunk.choices]
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message, {"get_weather", "get_time"})
    entries = [entry for delta in deltas for entry in delta.tool_calls or ()]
    firsts = [entry for entry in entries if entry.id is not None]
    assert len(firsts) == len(choice.message.tool_calls)
    assert all(entry.function.name for entry in firsts)
    assert all(entry.function.name is None for entry in entries if entry.id is None)


def test_parse_with_a_pydantic_tool(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Define 'cat'."}],
        tools=[openai.pydantic_function_tool(Lookup)], tool_choice="required",
        parallel_tool_calls=False, max_tokens=200)
    call, = completion.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Lookup)


HERMES_CALL = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "(UTC|CET)"}}\n'
               "</tool_call>")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_models_hermes_calls(client, stream):
    """The random model writes a hermes call when a regex makes it; "auto" reads it."""
    regex = "I will check\\. " + HERMES_CALL.replace("{", "\\{").replace("}", "\\}")
    fields = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                  extra_body={"structured_outputs": {"regex": regex}})
    if not stream:
        choice = client.chat.completions.create(**fields).choices[0]
        message, reason = choice.message, choice.finish_reason
    else:
        with client.chat.completions.stream(**fields) as events:
            choice = events.get_final_completion().choices[0]
        message, reason = choice.message, choice.finish_reason
    assert reason == "tool_calls"
    assert message.content == "I will check. "
    call, = message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_auto_without_a_call_is_content(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=6,
        extra_body={"structured_outputs": {"choice": ["Sunny", "Rainy"]}}).choices[0]
    assert choice.message.content in ("Sunny", "Rainy") and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_tool_choice_none_reads_nothing(client):
    regex = HERMES_CALL.replace("{", "\\{").replace("}", "\\}")
    choice = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="none",
        max_tokens=120, extra_body={"structured_outputs": {"regex": regex}}).choices[0]
    assert choice.message.content.startswith("<tool_call>") and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_the_sdks_messages_go_back_as_history(client):
    """An agent's loop: the assistant's message as the SDK returned it, then the result."""
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80)
    message = completion.choices[0].message
    assert message.tool_calls, completion
    history = [*MESSAGES, message,
               *({"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}
                 for call in message.tool_calls)]
    follow_up = client.chat.completions.create(model=MODEL, messages=history,
                                               tools=[WEATHER], max_tokens=5)
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {
        "name": "bad", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s(server, fields, param):
    response = httpx.post(f"{server}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {SERVED_API_KEY}"},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, **fields},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
