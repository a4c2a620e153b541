"""Chat templates: which one applies to a conversation, and rendering it.

A template comes, in order of precedence, from the request (`LLM.chat(...,
chat_template=...)` or the HTTP body's `chat_template`), the config
(`model.chat_template`), or the model's tokenizer. Rendering is transformers'
`apply_chat_template`; this module reads a given template (vLLM's file-or-Jinja
rule) and says clearly when there is none, for `LLM.chat` and the HTTP ingress
alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What marks a string as a Jinja template rather than a file name (vLLM's rule).
JINJA_MARKERS = ("{{", "{%")
NO_TEMPLATE = ("the model has no chat template; give one with chat_template= (a file or a "
               "Jinja string), model.chat_template in the config, or the request's "
               "chat_template field")


class NoChatTemplateError(ValueError):
    """Neither the request, the config nor the tokenizer has a chat template."""

    def __init__(self) -> None:
        super().__init__(NO_TEMPLATE)


def is_jinja(text: str) -> bool:
    return any(marker in text for marker in JINJA_MARKERS)


def load_chat_template(value: str) -> str:
    """The template `value` names: an existing file's text, else `value` itself if it
    is Jinja (vLLM's rule). Raises ValueError when it is neither."""
    path = Path(value).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a long inline template is no valid file name
        exists = False
    if exists:
        if not path.is_file():
            raise ValueError(f"the chat_template path {value!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the chat_template file {value!r}: {error}") from None
        if not is_jinja(text):  # also keeps the loaded text valid when read again
            raise ValueError(f"the chat_template file {value!r} holds no Jinja template "
                             "(no '{{' or '{%')")
        return text
    if is_jinja(value):
        return value
    raise ValueError(f"the chat_template file {value!r} does not exist, and the value is not "
                     "an inline Jinja template either (it has no '{{' or '{%')")


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]],
                chat_template: str | None = None, **kwargs: Any) -> list[int]:
    """The prompt token ids of `conversation`, rendered by transformers with
    `chat_template` (Jinja text or a template's name), else the tokenizer's own.

    Tokenized by the template itself: its text already holds the special tokens
    (BOS), which tokenizing the rendered string would add again. Raises
    NoChatTemplateError (a ValueError naming chat_template) when there is none.
    """
    if chat_template is None and not tokenizer.chat_template:
        raise NoChatTemplateError
    return list(tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                              tokenize=True, return_dict=False, **kwargs))
