"""Tool calling on chat completions: OpenAI's `tools`, `tool_choice` and `tool_calls`.

    tools ─────────────────────────> the chat template, which shows the model the functions
    tool_choice "required" / named ─> a JSON schema that the grammar enforces while decoding
    the output ──ToolParser──────────> message.tool_calls, or delta.tool_calls as they grow

"auto" reads calls out of the model's own format, with the parser that
serving.tool_call_parser names (cluster/tool_parsers.py). "required" and a
named function need no parser of the model's: the grammar makes the output a
list of calls, or the named function's arguments, so every response parses
and its arguments validate against the tool's schema. "none" shows the model
the tools and reads nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from pagedserve.cluster.errors import bad_request
from pagedserve.cluster.parsing import StrictModel
from pagedserve.cluster.tool_parsers import (
    PARSERS,
    NamedParser,
    NotToolCalls,
    Parsed,
    RequiredParser,
    ToolParser,
)

MAX_TOOLS = 128  # OpenAI's limit on functions per request

# A function without `parameters` takes none (OpenAI's rule).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # "required" and named calls always follow the schema


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text


class ToolCall(StrictModel):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"]
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """As chat templates take it: arguments as an object where they parse (templates
        write them with tojson, which would quote the text again; vLLM does the same)."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


def forced_schema(tools: list[Tool], choice: ToolChoice, parallel: bool) -> dict[str, Any]:
    """The JSON schema of the output that tool_choice "required" or a named function
    asks for: that function's arguments, or a list of calls ({"name", "parameters"},
    RequiredParser's format), one at most unless calls may run in parallel."""
    if isinstance(choice, NamedToolChoice):
        tool = next(tool for tool in tools if tool.function.name == choice.function.name)
        return tool.function.parameters or NO_PARAMETERS
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                             "parameters": tool.function.parameters or NO_PARAMETERS},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class ToolCalling:
    """How one request's output is read for tool calls."""

    parser: ToolParser
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only

    @classmethod
    def of(cls, tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None,
           configured_parser: str | None) -> ToolCalling | None:
        """None when nothing is read (no tools, or tool_choice "none")."""
        if not tools or choice == "none":
            return None
        parallel = parallel is not False
        if choice == "required":
            return cls(RequiredParser(), parallel)
        if isinstance(choice, NamedToolChoice):
            return cls(NamedParser(choice.function.name), parallel)
        if configured_parser is None:
            raise bad_request('tool_choice: "auto" needs the server to read tool calls from the '
                              "model's output, and serving.tool_call_parser is not set (one of "
                              f"{', '.join(PARSERS)}); send tool_choice \"none\", \"required\" "
                              "or a named function instead", "tool_choice")
        return cls(PARSERS[configured_parser](), parallel)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason: its calls, or the text as
        content when it holds none that parse (the model chose not to call, or
        was cut off)."""
        try:
            parsed = self.parser.parse(text, final=True)
        except NotToolCalls:
            parsed = Parsed(len(text))
        calls = self.kept(parsed)
        if not calls or not all(call.name is not None and call.done and _is_json(call.arguments)
                                for call in calls):
            return {"role": "assistant", "content": text}, finish_reason
        content = text[:parsed.content_end]
        entries = [{"id": self.parser.new_call_id(), "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}
                   for call in calls]
        return ({"role": "assistant", "content": content if content.strip() else None,
                 "tool_calls": entries}, called(finish_reason))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def kept(self, parsed: Parsed) -> list:
        """The calls read, or only the first without parallel calls."""
        return parsed.calls if self.parallel else parsed.calls[:1]


def called(finish_reason: str | None) -> str | None:
    """The finish reason of a choice that called tools: "tool_calls" where the model
    stopped by itself (OpenAI's); a cut-off call stays "length"."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class ToolCallStream:
    """One streamed choice's deltas: content, then each call's id and name once, then
    its arguments as they grow, as OpenAI streams them."""

    def __init__(self, calling: ToolCalling) -> None:
        self._calling = calling
        self._text = ""
        self._content_sent = 0  # characters of the text sent as content
        self._ids: list[str] = []  # of the calls sent, in order
        self._arguments_sent: list[int] = []  # characters of each call's arguments sent

    @property
    def called(self) -> bool:
        return bool(self._ids)

    def update(self, text: str, finished: bool) -> dict:
        """The delta for the choice's new `text` ({} while nothing can be sent yet)."""
        self._text += text
        try:
            parsed = self._calling.parser.parse(self._text, finished)
        except NotToolCalls:  # content, unless calls went out already: then the rest is dropped
            parsed = Parsed(self._content_sent if self._ids else len(self._text))
        entries = [entry for index, call in enumerate(self._calling.kept(parsed))
                   if call.name is not None and (entry := self._entry(index, call))]
        content_end = parsed.content_end
        if finished and not self._ids:  # no call came of it: all of it is content
            content_end = len(self._text)
        delta: dict[str, Any] = {}
        if content_end > self._content_sent:
            delta["content"] = self._text[self._content_sent:content_end]
            self._content_sent = content_end
        if entries:
            delta["tool_calls"] = entries
        return delta

    def _entry(self, index: int, call) -> dict | None:
        if index > len(self._ids):  # an earlier call has no name yet: calls go in order
            return None
        function: dict[str, str] = {}
        entry: dict[str, Any] = {"index": index}
        if index == len(self._ids):
            self._ids.append(self._calling.parser.new_call_id())
            self._arguments_sent.append(0)
            entry.update(id=self._ids[index], type="function")
            function.update(name=call.name, arguments="")
        new = call.arguments[self._arguments_sent[index]:]
        if new:
            function["arguments"] = new
            self._arguments_sent[index] = len(call.arguments)
        if not function:
            return None
        entry["function"] = function
        return entry
