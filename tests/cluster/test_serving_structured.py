"""Structured outputs through the OpenAI-compatible server, with the official `openai`
client: `chat.completions.parse` with a pydantic model, response_format json_object
and json_schema, vLLM's `structured_outputs` and older `guided_*` fields on both
endpoints, streamed and not; bad specs are 400s that name the field the client
sent. The session's shared app serves tiny-cpu's random model, so only the
constraint makes its text valid.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import SERVED_API_KEY, SERVED_TINY_CPU, served_tiny_cpu
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Describe a shirt."}]
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}


class Shirt(BaseModel):
    size: Literal["S", "M", "L"]
    in_stock: bool
    count: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def server(shared_app):
    return shared_app(SERVED_TINY_CPU, served_tiny_cpu()).direct


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0)


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=MESSAGES,
                                               response_format=Shirt, max_tokens=80)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Shirt), message.content
    assert Shirt.model_validate_json(message.content) == message.parsed


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object(client, stream):
    formats = [{"type": "json_schema", "json_schema": {"name": "shirt", "schema": SCHEMA,
                                                         "strict": True}},
               {"type": "json_object"}]
    for response_format in formats:
        text = _chat(client, stream, response_format=response_format, max_tokens=80,
                     temperature=0.0)
        document = json.loads(text)
        assert isinstance(document, dict)
        if response_format["type"] == "json_schema":
            jsonschema.validate(document, SCHEMA)


def _chat(client, stream: bool, **fields) -> str:
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                              **fields).choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            **fields)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _complete(client, stream: bool, extra_body: dict) -> str:
    fields = dict(model=MODEL, prompt="Answer:", max_tokens=60, temperature=0.0,
                  extra_body=extra_body)
    if not stream:
        return client.completions.create(**fields).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(
        stream=True, **fields) if chunk.choices)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra_body, valid", [
    ({"structured_outputs": {"json": SCHEMA}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"regex": r"[a-c]{3}-\d"}}, lambda t: re.fullmatch(r"[a-c]{3}-\d", t)),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"grammar": 'root ::= "<" ab ab ">"\nab ::= "a" | "b"'}},
     lambda t: re.fullmatch(r"<[ab]{2}>", t)),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_regex": r"\d{3}"}, lambda t: re.fullmatch(r"\d{3}", t)),
    ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    ({"guided_grammar": 'root ::= "x" "y"?'}, lambda t: t in ("x", "xy")),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_vllm_fields_on_completions(client, stream, extra_body, valid):
    text = _complete(client, stream, extra_body)
    assert valid(text), text


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {SERVED_API_KEY}"})


COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 8}
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {**COMPLETION, "structured_outputs": {"regex": "(ab"}},
     "structured_outputs.regex", "does not compile"),
    ("/v1/completions", {**COMPLETION, "guided_grammar": "root ::= nowhere"},
     "guided_grammar", "does not compile"),
    ("/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "does not compile"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}},
     "response_format.json_schema", "required with type 'json_schema'"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a", "guided_choice": ["b"]},
     "guided_choice", "cannot be combined with guided_regex"),
    ("/v1/completions", {**COMPLETION, "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs", "exactly one of"),
    ("/v1/completions", {**COMPLETION, "guided_json": "{not json"},
     "guided_json", "not valid JSON"),
    ("/v1/completions", {**COMPLETION, "use_beam_search": True, "n": 2,
                         "guided_choice": ["a", "b"]},
     "guided_choice", "is not supported with use_beam_search=true"),
])
def test_bad_specs_are_400s_naming_the_field_sent(server, path, body, param, words):
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_the_server_serves_on_after_bad_specs(client):
    assert _complete(client, False, {"guided_choice": ["fine"]}) == "fine"


def _deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Grammars are user input that compiles to automata: nesting 300 deep (seconds to
# compile), an enum of 4,000 values, a regex that backtracking engines take
# exponential time on, a left-recursive grammar, 2,000 choices.
PATHOLOGICAL = [{"guided_json": _deep_schema(300)},
                {"guided_json": {"enum": [f"v{i}" for i in range(4000)]}},
                {"guided_regex": "(a+)+(b|c+)*$"},
                {"guided_grammar": 'root ::= root "a" | "b"'},
                {"guided_choice": [f"option {i}" for i in range(2000)]}]


def test_pathological_specs_never_stall_other_streams(server):
    """While each pathological spec compiles (or is refused), an unconstrained stream goes
    on to its last token, and every pathological request ends: served or a 400 that
    names its field."""
    import asyncio

    async def stream() -> int:
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 48, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        usage = None
        async with httpx.AsyncClient(timeout=120) as http, http.stream(
                "POST", f"{server}/v1/completions", json=body,
                headers={"Authorization": f"Bearer {SERVED_API_KEY}"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
        return usage["completion_tokens"]

    async def pathological(extra: dict) -> tuple[int, dict]:
        async with httpx.AsyncClient(timeout=120) as http:
            response = await http.post(f"{server}/v1/completions",
                                       json={**COMPLETION, "max_tokens": 16, **extra},
                                       headers={"Authorization": f"Bearer {SERVED_API_KEY}"})
        return response.status_code, response.json()

    async def main():
        return await asyncio.gather(stream(), *(pathological(extra) for extra in PATHOLOGICAL))

    streamed, *answers = asyncio.run(main())
    assert streamed == 48
    for extra, (status, body) in zip(PATHOLOGICAL, answers, strict=True):
        field = next(iter(extra))
        assert status == 200 or (status == 400 and body["error"]["param"] == field), body
