"""Tool calls in a model's output text: each model family's format, read whole or so far.

    "Let me check.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>"
     └── content ─┘           └── call: its name, and its arguments' raw text ──┘

A parser reads the text generated so far and says how much of its start is
content (text a partial tool-call marker may still follow is held back) and
which calls it holds. A call's arguments are the raw JSON text the model wrote,
cut from the output as it grows: each reading's arguments are a prefix of the
next's, so a stream sends only what is new (cluster/tools.py), and the whole
response and the stream agree to the byte. Text that is not in the format
raises NotToolCalls; the caller then shows it as content.

The formats are the ones vLLM's parsers of the same names read:
- `hermes` (Qwen2.5, Qwen3, Hermes and most fine-tunes): content, then
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call;
- `llama3_json` (Llama 3.1+): the whole output is `{"name": ..., "parameters": {...}}`,
  calls separated by `;`, optionally after `<|python_tag|>`;
- `mistral`: content, then `[TOOL_CALLS]` and a JSON list of `{"name", "arguments"}`
  objects, or (newer tokenizers) `name[ARGS]{...}` per call.
Two more are not the model's choice but the grammar's (tool_choice "required"
and a named function): a JSON list of `{"name", "parameters"}`, and the bare
arguments of the named function.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

_WHITESPACE = " \t\n\r"


class NotToolCalls(ValueError):
    """The text is not in the parser's format: it is content."""


@dataclass
class CallDraft:
    """One tool call as read so far."""

    name: str | None = None  # once its JSON string is complete
    arguments: str = ""  # the raw text of its arguments so far
    done: bool = False  # its object (or, for a named function, the output) is complete


@dataclass
class Parsed:
    content_end: int  # text[:content_end] is content, safe to show
    calls: list[CallDraft] = field(default_factory=list)


# ---------------------------------------------------------------------------- JSON scanning


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """The end of the JSON value that starts at text[i], or None if the text ends first.

    Tracks nesting and strings only: the model's JSON is checked once whole
    (json.loads); this finds where a value stops as the text grows.
    """
    first = text[i]
    if first == '"' or first in "{[":
        depth, in_string, j = 0, False, i
        while j < len(text):
            char = text[j]
            if in_string:
                if char == "\\":
                    j += 1
                elif char == '"':
                    in_string = False
                    if depth == 0:
                        return j + 1
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    if first in "}],:":
        raise NotToolCalls(f"a JSON value was expected at {first!r}")
    j = i
    while j < len(text) and text[j] not in _WHITESPACE + ",}]":
        j += 1
    return j if j < len(text) else None  # a number may go on


def scan_call(text: str, i: int, arguments_keys: tuple[str, ...]) -> tuple[CallDraft, int | None]:
    """The call object starting at text[i] ('{'): its name and arguments so far, and
    the object's end (None while it is incomplete)."""
    if text[i] != "{":
        raise NotToolCalls("a tool call must be a JSON object")
    call, j = CallDraft(), i + 1
    while True:
        j = _skip_space(text, j)
        if j == len(text):
            return call, None
        if text[j] == "}":
            call.done = True
            return call, j + 1
        if text[j] == ",":
            j += 1
            continue
        if text[j] != '"':
            raise NotToolCalls("a tool call's keys must be strings")
        key_end = value_end(text, j)
        if key_end is None:
            return call, None
        key = json.loads(text[j:key_end])
        j = _skip_space(text, key_end)
        if j == len(text):
            return call, None
        if text[j] != ":":
            raise NotToolCalls(f"':' was expected after the key {key!r}")
        j = _skip_space(text, j + 1)
        if j == len(text):
            return call, None
        end = value_end(text, j)
        if key == "name" and end is not None:
            name = json.loads(text[j:end])
            if not isinstance(name, str):
                raise NotToolCalls("a tool call's name must be a string")
            call.name = name
        elif key in arguments_keys:
            call.arguments = text[j:end]  # a slice to None is the text so far
        if end is None:
            return call, None
        j = end


def scan_call_list(text: str, i: int, arguments_keys: tuple[str, ...]
                   ) -> tuple[list[CallDraft], int | None]:
    """The calls of the JSON list starting at text[i] ('['), and the list's end."""
    if text[i] != "[":
        raise NotToolCalls("tool calls must be a JSON list")
    calls: list[CallDraft] = []
    j = i + 1
    while True:
        j = _skip_space(text, j)
        if j == len(text):
            return calls, None
        if text[j] == "]":
            return calls, j + 1
        if text[j] == ",":
            j += 1
            continue
        call, end = scan_call(text, j, arguments_keys)
        calls.append(call)
        if end is None:
            return calls, None
        j = end


def held_back(text: str, marker: str) -> int:
    """How many of the text's last characters could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


# ---------------------------------------------------------------------------- parsers


class ToolParser(ABC):
    """Reads tool calls out of one model family's output text."""

    name = ""
    # Whether the format's marker is a special token, which the text must then keep.
    keeps_special_tokens = False

    @abstractmethod
    def parse(self, text: str, final: bool) -> Parsed:
        """Content and calls of `text`, the output so far (all of it when `final`).
        Raises NotToolCalls for text that is not in the format."""

    def new_call_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"


class _MarkedParser(ToolParser):
    """Content, then `marker` before the calls."""

    marker = ""

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.marker)
        if start < 0:
            return Parsed(len(text) if final else len(text) - held_back(text, self.marker))
        return Parsed(start, self._calls(text, start + len(self.marker)))

    @abstractmethod
    def _calls(self, text: str, i: int) -> list[CallDraft]:
        """The calls after the marker, which ends at text[i]."""


class HermesParser(_MarkedParser):
    name, marker = "hermes", "<tool_call>"

    def _calls(self, text: str, i: int) -> list[CallDraft]:
        calls = []
        while i >= 0:
            i = _skip_space(text, i)
            if i == len(text):
                break
            call, end = scan_call(text, i, ("arguments",))
            calls.append(call)
            if end is None:
                break
            i = text.find(self.marker, end)
            i = i + len(self.marker) if i >= 0 else -1
        return calls


class MistralParser(_MarkedParser):
    name, marker, keeps_special_tokens = "mistral", "[TOOL_CALLS]", True
    ARGS = "[ARGS]"

    def _calls(self, text: str, i: int) -> list[CallDraft]:
        i = _skip_space(text, i)
        if i == len(text):
            return []
        if text[i] == "[":
            return scan_call_list(text, i, ("arguments",))[0]
        calls = []  # name[ARGS]{...}, each after its own marker
        while i >= 0:
            args = text.find(self.ARGS, i)
            if args < 0:
                break
            call = CallDraft(name=text[i:args].strip())
            start = _skip_space(text, args + len(self.ARGS))
            if start < len(text):
                end = value_end(text, start)
                call.arguments, call.done = text[start:end], end is not None
            calls.append(call)
            if not call.done:
                break
            i = text.find(self.marker, start)
            i = _skip_space(text, i + len(self.marker)) if i >= 0 else -1
        return calls

    def new_call_id(self) -> str:
        """Mistral's templates take ids of nine letters and digits only."""
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_space(text, 0)
        if text.startswith(self.TAG, i):
            i = _skip_space(text, i + len(self.TAG))
        elif not final and self.TAG.startswith(text[i:]):  # undecided yet
            return Parsed(0)
        if i == len(text):
            return Parsed(len(text) if final else 0)
        if text[i] != "{":
            return Parsed(len(text))
        calls = []
        while True:
            call, end = scan_call(text, i, ("parameters", "arguments"))
            calls.append(call)
            if end is None:
                break
            i = _skip_space(text, end)
            if i == len(text):
                break
            if text[i] != ";":
                raise NotToolCalls("calls must be separated by ';'")
            i = _skip_space(text, i + 1)
            if i == len(text):
                break
        return Parsed(0, calls)


class RequiredParser(ToolParser):
    """tool_choice "required": the grammar's JSON list of {"name", "parameters"}."""

    name = "required"

    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_space(text, 0)
        return Parsed(0, scan_call_list(text, i, ("parameters",))[0] if i < len(text) else [])


class NamedParser(ToolParser):
    """A named tool_choice: the output is the arguments of that function."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed(0, [CallDraft(self.function, text.lstrip(), final)])


PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)}
