"""Config errors as a reader of the YAML wants them: the key path, the value and the rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

# The key that picks a member of a tagged union (the autoscaling policy).
DISCRIMINATOR = "name"


def _key_path(loc: tuple[int | str, ...], data: Any) -> list[str]:
    """The YAML keys of an error location.

    Inside a tagged union pydantic adds the member's tag to the location
    (`autoscaling.policy.kv_utilization.target_utilization`); the file has no
    such key, so a part that is not a key but the mapping's tag is left out.
    A value of a plain union (`ingress_replicas: 2 | auto`) gets each member's
    name after it (`constrained-int`, `literal['auto']`): the parts past a
    scalar value are left out too.
    """
    keys, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get(DISCRIMINATOR) == part:
            continue
        if isinstance(node, str | int | float) and keys:
            break
        keys.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return keys


def _format_error(item: ErrorDetails, data: Any) -> str:
    keys = _key_path(item["loc"], data)
    message, value = item["msg"].removeprefix("Value error, "), item.get("input")
    # A missing or unknown tag is an error of the tag's key, not of the whole mapping.
    if item["type"] == "union_tag_not_found":
        keys.append(DISCRIMINATOR)
        message = "Field required"
    elif item["type"] == "union_tag_invalid":
        keys.append(DISCRIMINATOR)
        message, value = f"must be one of {item['ctx']['expected_tags']}", value[DISCRIMINATOR]
    return f"  {'.'.join(keys) or '<root>'}: {message} (got {value!r})"


def format_errors(error: ValidationError, data: Any, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    lines.extend(_format_error(item, data) for item in error.errors())
    return "\n".join(lines)


def yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """One line: where the parser stopped, and what it expected there."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{path}: not valid YAML: {error}"
    mark = error.problem_mark
    context = f" ({error.context})" if error.context else ""
    return (f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: "
            f"{error.problem}{context}")
