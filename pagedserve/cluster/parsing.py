"""Raw request bodies into the request models of cluster/protocol.py, strictly.

Validation is strict, as OpenAI's is: no "5" for an integer, no unknown
fields, no lone surrogates in text, and every error (cluster/errors.py) is a
400 that names the field (as `param`), the value and the limit. Server-side
bounds (`RequestBounds`) reach the models' validators as pydantic's context.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pagedserve.cluster.errors import OpenAIError, bad_request

# OpenAI allows 4 stop sequences; vLLM sets no limit, and lm-eval's tasks send 5
# and more. serving.max_stop_sequences sets it.
DEFAULT_MAX_STOP_SEQUENCES = 64


class StrictModel(BaseModel):
    """A request body or part of one: no unknown fields, no coerced types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FieldError(ValueError):
    """A cross-field rule broken in a model validator; `param` names the field to blame."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestBounds:
    """Server-side bounds a request is checked against (from the serving config)."""

    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES


def parse_request(model_cls: type[BaseModel], body: bytes,
                  bounds: RequestBounds = RequestBounds()) -> BaseModel:
    """Validate a raw body into `model_cls`; any problem becomes a 400 naming the field."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, not {_json_type(data)}")
    if not body.isascii() or _SURROGATE_ESCAPE.search(body):
        _check_unicode(data, ())  # else no string in it can hold a lone surrogate
    return validate_request(model_cls, data, bounds)


# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF): in an ASCII body, the only way
# to spell one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any, loc: tuple[str | int, ...]) -> None:
    """JSON's \\uXXXX escapes can spell lone surrogates, which are not text: refuse them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            param = _path(loc) or "body"
            raise bad_request(f"{param}: not valid Unicode (a lone surrogate "
                              f"{value[exc.start]!a} at character {exc.start})", param) from None
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, (*loc, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, loc)
            _check_unicode(item, (*loc, key))


def validate_request(model_cls: type[BaseModel], data: dict[str, Any],
                     bounds: RequestBounds = RequestBounds()) -> BaseModel:
    """Validate decoded fields (JSON, or a gRPC message's) into `model_cls`; errors are 400s."""
    try:
        return model_cls.model_validate(data, context=bounds)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> OpenAIError:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    value = error["input"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):  # raised by a model validator: blame one of its fields
        loc += (cause.param,)
        value = value.get(cause.param) if isinstance(value, dict) else value
    param = _path(loc)
    if error["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if error["type"] == "missing":
        return bad_request(f"{param}: Field required", param)
    message = error["msg"].removeprefix("Value error, ")
    return bad_request(f"{param}: {message} (got {_shorten(value)})", param)


def _path(loc: tuple[str | int, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', as OpenAI names nested params."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


def _shorten(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
