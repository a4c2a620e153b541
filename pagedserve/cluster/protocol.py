"""The OpenAI-compatible wire format, inbound: the request models (the sampling fields
every request shares, and the completion request; the chat request is in
cluster/chat_protocol.py).

Pure Python (pydantic only), so the ingress stays a thin shell: it parses a
body into one of these (cluster/parsing.py) and turns the request into
`SamplingParams`; cluster/responses.py turns the engine's outputs back into
OpenAI's JSON. Where OpenAI is silent we follow vLLM's OpenAI server (extra
sampling fields, with vLLM's names and meanings).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pagedserve.cluster.errors import bad_request
from pagedserve.cluster.parsing import DEFAULT_MAX_STOP_SEQUENCES, FieldError, StrictModel
from pagedserve.errors import RequestError
from pagedserve.sampling_params import (
    MAX_LOGPROBS,
    STRUCTURED_KINDS,
    SamplingParams,
    StructuredOutputsParams,
)

MAX_N = 128  # OpenAI's limit on choices per prompt


# ---------------------------------------------------------------------------- requests

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(StrictModel):
    include_usage: bool = False
    # vLLM's: usage (so far) in every chunk, not only in the last.
    continuous_usage_stats: bool = False


class StructuredOutputsBody(StrictModel):
    """vLLM's `structured_outputs` field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(StrictModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(StrictModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise FieldError("json_schema", "is required with type 'json_schema', and only "
                                            "with it")
        return self


# The request fields that constrain the output (at most one of them per request).
STRUCTURED_FIELDS = ("structured_outputs", "response_format", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")


class SamplingRequest(StrictModel):
    """Fields the two endpoints share, and their conversion to SamplingParams."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None  # accepted for compatibility; not used
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int = Field(-1, ge=-1)  # -1 and 0 disable it
    min_p: Probability = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Accepted at their defaults only: they ask for what this server does not do.
    spaces_between_special_tokens: bool = True
    priority: int = 0
    # Honoured by the ingress: the prompt's last tokens only, special tokens added
    # by the tokenizer (completions), tokens reported as "token_id:<id>", the id.
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    return_tokens_as_token_ids: bool = False
    request_id: str | None = Field(None, min_length=1, max_length=256)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, and
    # vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Logits controls: OpenAI's logit_bias ({token id: -100..100}), vLLM's min_tokens and
    # allowed_token_ids.
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    bad_words: list[str] | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: Any, info: ValidationInfo) -> str | list[str] | None:
        try:
            stop = handler(value)
        except ValidationError:
            raise ValueError("must be a string or a list of strings") from None
        stops = [stop] if isinstance(stop, str) else stop or []
        limit = info.context.max_stop_sequences if info.context else DEFAULT_MAX_STOP_SEQUENCES
        if len(stops) > limit:
            raise ValueError(f"at most {limit} stop sequences are allowed ({len(stops)} given; "
                             "serving.max_stop_sequences sets the limit)")
        if not all(stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _check_combinations(self) -> SamplingRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise FieldError("best_of", f"must be at least n={self.n}")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "is only allowed when stream=true")
        if self.stream and self.use_beam_search:
            raise FieldError("use_beam_search", "beam search results cannot be streamed")
        if self.stream and (self.best_of or self.n) > self.n:
            # The engine re-ranks the best_of candidates every step: nothing stable to stream.
            raise FieldError("best_of", f"must equal n={self.n} when stream=true")
        if not self.spaces_between_special_tokens:
            raise FieldError("spaces_between_special_tokens", "only true is supported")
        if self.priority != 0:
            raise FieldError("priority", "only 0 is supported: requests are scheduled first "
                                         "come, first served")
        constraints = self._constraint_fields()
        if len(constraints) > 1:
            raise FieldError(constraints[1], f"cannot be combined with {constraints[0]}: a "
                                             "request takes one output constraint")
        if constraints and self.use_beam_search:
            raise FieldError(constraints[0], "is not supported with use_beam_search=true: beam "
                                             "search ranks candidates by the model's own "
                                             "log-probabilities, not by what a grammar allows")
        return self

    def _constraint_fields(self) -> list[str]:
        """The output constraints this request sets (response_format text is none)."""
        fields = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            fields.remove("response_format")
        return fields

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's output constraint as the engine takes it, or None."""
        fields = self._constraint_fields()
        if not fields:
            return None
        name = fields[0]
        if name == "response_format":
            response_format = self.response_format
            assert response_format is not None
            if response_format.type == "json_object":
                return StructuredOutputsParams(json_object=True)
            assert response_format.json_schema is not None
            return StructuredOutputsParams(json=response_format.json_schema.json_schema)
        if name == "structured_outputs":
            body = self.structured_outputs
            assert body is not None
            return StructuredOutputsParams(json=body.json_schema, regex=body.regex,
                                           choice=body.choice, grammar=body.grammar,
                                           json_object=body.json_object)
        kind = name.removeprefix("guided_")
        return StructuredOutputsParams(**{kind: getattr(self, name)})

    def _structured_param_names(self) -> dict[str, str]:
        """The engine's names of structured-output errors -> the field the client sent."""
        fields = self._constraint_fields()
        if not fields:
            return {}
        name = fields[0]
        if name == "response_format":
            field = ("response_format.json_schema.schema"
                     if self.response_format.type == "json_schema" else "response_format")
            return {"structured_outputs": field, "structured_outputs.json": field,
                    "structured_outputs.json_object": field}
        if name == "structured_outputs":
            return {f"structured_outputs.{kind}": f"structured_outputs.{kind}"
                    for kind in STRUCTURED_KINDS}
        return {"structured_outputs": name, f"structured_outputs.{name.removeprefix('guided_')}":
                name}

    @abstractmethod
    def max_tokens_requested(self) -> int | None:
        """The generation limit the client set; None means "up to the context limit"."""

    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    @abstractmethod
    def prompt_param(self) -> str:
        """The field that holds the prompt, for errors about it."""

    @abstractmethod
    def _logprobs(self) -> int | None:
        """The SamplingParams.logprobs this request asks for."""

    def _prompt_logprobs(self) -> int | None:
        """The SamplingParams.prompt_logprobs this request asks for."""
        return None

    def param_names(self) -> dict[str, str]:
        """The engine's names of this request's parameters -> the fields the client sent."""
        return {"prompt_token_ids": self.prompt_param, "prompt": self.prompt_param,
                "max_tokens": self.max_tokens_param(), "lora_request": "model",
                **self._structured_param_names()}

    def sampling_params(self, room: int) -> SamplingParams:
        """SamplingParams for one prompt; `room` is what its context leaves (checked by
        engine.capacity.context_room: the one home of that rule).

        An unset max_tokens means "up to the limit" (vLLM). An unset temperature
        reaches SamplingParams unset (1, or nothing with beam search), and so does
        top_k -1 (vLLM's "off"): SamplingParams holds the one rule for beam search's
        sampling knobs (those the client set are ignored, with a warning).
        max_tokens 0 (echo only) generates one token that is not reported, as vLLM does.
        """
        max_tokens = self.max_tokens_requested()
        if max_tokens is None:
            max_tokens = room
        temperature = self.temperature if "temperature" in self.model_fields_set else None
        try:
            structured = self.structured_outputs_params()
            return SamplingParams(
                n=self.n, best_of=self.best_of, use_beam_search=self.use_beam_search,
                temperature=temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, max_tokens=max(max_tokens, 1),
                stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
                ignore_eos=self.ignore_eos, seed=self.seed, logprobs=self._logprobs(),
                prompt_logprobs=self._prompt_logprobs(),
                length_penalty=self.length_penalty, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=structured, min_tokens=self.min_tokens,
                logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words or ())
        except RequestError as exc:  # names the field; SamplingParams' names are the API's
            message = exc.message.removeprefix("SamplingParams.")
            raise bad_request(message, self.param_names().get(exc.param, exc.param)) from None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    # Left to right, token ids before text: pydantic's smart mode tries every member,
    # and a list of token ids failing list[str] costs an error per token.
    prompt: str | list[TokenId] | list[list[TokenId]] | list[str] = Field(
        union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    # vLLM extras
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: Any) -> Any:
        try:
            prompt = handler(value)
        except ValidationError as exc:
            if any(error["type"] == "greater_than_equal" for error in exc.errors()):
                raise ValueError("token ids must be >= 0") from None
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids") from None
        # An empty string is a valid prompt (the tokenizer may add BOS); no tokens is not.
        if isinstance(prompt, list) and (not prompt or [] in prompt):
            raise ValueError("must not be empty")
        return prompt

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "must be at least 1 (0 is allowed with echo=true: "
                                           "the prompt only)")
        if self.use_beam_search and self.logprobs is not None:
            raise FieldError("logprobs", "is not supported with use_beam_search=true")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs", "is not available with stream=true (vLLM's "
                                                "rule); use echo with logprobs")
        if (self.echo and self.logprobs is not None and self.prompt_logprobs is not None
                and self.prompt_logprobs != self.logprobs):
            raise FieldError("prompt_logprobs", f"must equal logprobs={self.logprobs} with "
                                                "echo=true, which reports the prompt's logprobs")
        return self

    @property
    def prompt_param(self) -> str:
        return "prompt"

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: the prompt comes back, nothing generated."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def max_tokens_requested(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None
