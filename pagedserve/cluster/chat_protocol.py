"""The OpenAI-compatible wire format, inbound: the chat request.

`ChatCompletionRequest` is a sampling request (cluster/protocol.py) whose prompt
is a conversation: its messages, the tools a model may call and how, and vLLM's
chat template options. The ingress renders it with the chat template
(pagedserve/chat_template.py) and turns it into `SamplingParams`, as it does a
completion.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pagedserve.cluster.parsing import FieldError, StrictModel
from pagedserve.cluster.protocol import SamplingRequest
from pagedserve.cluster.tools import (
    MAX_TOOLS,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    forced_schema,
)
from pagedserve.sampling_params import MAX_LOGPROBS, StructuredOutputsParams


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, in the history
    refusal: str | None = None  # the openai SDK sends back what it received

    @field_validator("content", mode="wrap")
    @classmethod
    def _check_content(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be a string or a list of {"type": "text", "text": "..."} '
                             "parts (only text is supported)") from None

    @model_validator(mode="after")
    def _check_has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise FieldError("content", f"is required for role '{self.role}'")
        if self.tool_calls is not None and self.role != "assistant":
            raise FieldError("tool_calls", "only assistant messages have tool calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise FieldError("tool_call_id", "is required for role 'tool': the id of the call "
                                             "this message answers")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines, as vLLM does."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # "auto" with tools, "none" without (OpenAI's)
    parallel_tool_calls: bool | None = None
    # vLLM extras, passed to the chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Jinja text (never a file of the server's) over the configured and the model's own
    chat_template: str | None = Field(None, min_length=1)
    add_special_tokens: bool = False

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _check_tool_choice(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be "none", "auto", "required" or {"type": "function", '
                             '"function": {"name": ...}}') from None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise FieldError("max_completion_tokens", f"conflicts with max_tokens="
                             f"{self.max_tokens}; set only one (max_tokens is deprecated)")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "requires logprobs=true")
        if self.use_beam_search and self.logprobs:
            raise FieldError("logprobs", "is not supported with use_beam_search=true")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "cannot be used with "
                                                       "add_generation_prompt=true")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise FieldError("tools", f"function names must be unique ({duplicate!r} is "
                                      "given twice)")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise FieldError("tool_choice", "is only allowed when tools are given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice", f"names the function {choice.function.name!r}, "
                                            f"which is not among the tools ({', '.join(names)})")

    @property
    def effective_tool_choice(self) -> ToolChoice | None:
        """tool_choice, defaulting to "auto" when tools are given (OpenAI's rule)."""
        if self.tool_choice is None and self.tools:
            return "auto"
        return self.tool_choice

    def _forces_tool_calls(self) -> bool:
        """tool_choice "required" or a named function: the grammar writes the calls."""
        choice = self.effective_tool_choice
        return choice == "required" or isinstance(choice, NamedToolChoice)

    def _constraint_fields(self) -> list[str]:
        fields = super()._constraint_fields()
        return ["tool_choice", *fields] if self._forces_tool_calls() else fields

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        if self._forces_tool_calls():
            assert self.tools is not None and self.tool_choice is not None
            return StructuredOutputsParams(json=forced_schema(
                self.tools, self.tool_choice, self.parallel_tool_calls is not False))
        return super().structured_outputs_params()

    def _structured_param_names(self) -> dict[str, str]:
        if self._forces_tool_calls():  # the schema is built from the tools' parameters
            return {"structured_outputs": "tools", "structured_outputs.json": "tools"}
        return super()._structured_param_names()

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (OpenAI's shape, as transformers' does)."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def prompt_param(self) -> str:
        return "messages"

    def conversation(self) -> list[dict[str, Any]]:
        """Messages for the tokenizer's chat template.

        'developer' is OpenAI's new name for 'system'; chat templates only know the latter.
        """
        conversation = []
        for message in self.messages:
            entry = {"role": "system" if message.role == "developer" else message.role,
                     "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            if message.tool_calls is not None:
                entry["tool_calls"] = [call.for_template() for call in message.tool_calls]
            conversation.append(entry)
        return conversation

    @property
    def num_top_logprobs(self) -> int | None:
        """What `chat_response`/`chat_logprobs` take: None unless logprobs were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_tokens_requested(self) -> int | None:
        """max_completion_tokens, or the deprecated max_tokens (equal if both are set)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def _logprobs(self) -> int | None:
        return self.num_top_logprobs
