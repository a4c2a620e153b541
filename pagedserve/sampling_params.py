"""Per-request sampling parameters (vLLM-compatible names and meanings)."""

from __future__ import annotations

import enum
import json as json_module
import logging
from dataclasses import dataclass

from pagedserve.errors import RequestError

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
# What the sampling knobs are when they change nothing: beam search sets them so.
_NEUTRAL_KNOBS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


class RequestOutputKind(enum.Enum):
    """What each output of a streamed request holds (vLLM's names)."""

    CUMULATIVE = 0  # everything so far
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # nothing until the request finishes, then everything


# The kinds of structured output, in the order their fields are checked.
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a request's output must match, enforced token by token (vLLM's names).

    Exactly one of: `json`, a JSON schema (a dict, or its text); `regex`; `choice`,
    strings the output must be one of; `grammar`, an EBNF grammar as xgrammar reads it
    (its start rule is `root`); `json_object=True`, any JSON object. A schema given as
    a dict is kept as its JSON text (keys in their order: the output's properties
    follow it), so that the params stay hashable.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in STRUCTURED_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise RequestError("structured_outputs", "structured_outputs must set exactly one "
                               f"of {', '.join(STRUCTURED_KINDS)}; got "
                               f"{', '.join(given) or 'none'}")
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json_module.dumps(self.json))
        elif self.json is not None:
            _check_structured(isinstance(self.json, str), "json", "must be a JSON schema "
                              "(a dict or its text)")
            try:
                schema = json_module.loads(self.json)
            except json_module.JSONDecodeError as error:
                raise RequestError("structured_outputs.json", "structured_outputs.json is "
                                   f"not valid JSON: {error}") from None
            _check_structured(isinstance(schema, (dict, bool)), "json",
                              "must be a JSON schema: an object (or true or false)")
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            _check_structured(bool(choice) and all(isinstance(c, str) and c for c in choice),
                              "choice", "must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            _check_structured(value is None or (isinstance(value, str) and value), kind,
                              "must be a non-empty string")
        _check_structured(self.json_object in (None, True), "json_object", "must be true")

    @property
    def kind(self) -> str:
        return next(kind for kind in STRUCTURED_KINDS if getattr(self, kind) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text: the schema, regex or grammar; the choices as a JSON list;
        empty for json_object."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json_module.dumps(list(value), ensure_ascii=False)
        return "" if value is True else value

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: (kind, spec)."""
        return self.kind, self.spec


def _check_structured(ok: bool, kind: str, rule: str) -> None:
    if not ok:
        raise RequestError(f"structured_outputs.{kind}", f"structured_outputs.{kind} {rule}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature=0` means greedy; unset (None) it is 1. `top_k=0` (or vLLM's -1)
    and `top_p=1` disable those filters. `max_tokens=None` means up to the
    context limit: max_model_len less the prompt's length (at least 1).
    Beam search ranks the model's own log-probabilities, as transformers'
    `generate(num_beams=..., do_sample=False)`: a temperature, top_p, top_k or
    min_p given with it is ignored, with a warning naming them.
    `logprobs=k` returns, for every generated token, its log-probability and the
    k most likely alternatives (log-softmax of the model's raw logits);
    `prompt_logprobs=k` does the same for every prompt token after the first.
    Invalid values raise `ValueError` naming the field, the value and the limit.
    """

    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    temperature: float | None = None  # None: 1 (0 with use_beam_search)
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    length_penalty: float = 1.0
    # Beam search: stop once best_of hypotheses are finished (True), when no
    # running beam can still beat them (False), or only at max_tokens ("never").
    early_stopping: bool | str = False
    skip_special_tokens: bool = True
    # Keep the stop string that ended the text (vLLM's name); off: it is cut off.
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # What the output must match, enforced while decoding; None: unconstrained.
    structured_outputs: StructuredOutputsParams | None = None
    # Logits controls (vLLM's): at least min_tokens tokens before EOS, a stop token id or
    # a stop string may end the output; logit_bias adds to a token's logit (OpenAI's
    # -100..100); allowed_token_ids restricts sampling to those tokens. Returned
    # logprobs stay the raw model's.
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    # Words never to complete: a word's last token is disallowed where the output ends
    # with the tokens before it (vLLM's bad_words). The engine tokenizes them into
    # bad_words_token_ids when the request is added.
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs",
                               StructuredOutputsParams(**self.structured_outputs))
        if self.logit_bias is not None:  # OpenAI sends token ids as strings
            object.__setattr__(self, "logit_bias", _token_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", (self.bad_words,) if isinstance(self.bad_words, str)
                           else tuple(self.bad_words))
        # Accept lists and a single string, as OpenAI clients send them.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.best_of is None:
            object.__setattr__(self, "best_of", self.n)
        if self.top_k == -1:  # vLLM's spelling of "off"
            object.__setattr__(self, "top_k", 0)
        if self.use_beam_search:
            self._ignore_sampling_knobs()
        elif self.temperature is None:
            object.__setattr__(self, "temperature", 1.0)
        self._validate()

    def _validate(self) -> None:
        _check(self.n >= 1, "n", self.n, "must be at least 1")
        _check(self.best_of >= self.n, "best_of", self.best_of, f"must be at least n={self.n}")
        _check(self.early_stopping in (True, False, "never"), "early_stopping",
               self.early_stopping, "must be True, False or 'never'")
        if self.use_beam_search:
            self._validate_beam_search()
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0, or -1 (0 and -1 disable it)")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "must be > 0")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be at least 1 (None: up to the context limit)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be non-negative token ids")
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
                   f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            _check(0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
                   self.prompt_logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "must be a RequestOutputKind")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               self.min_tokens, "must be a non-negative integer")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must be at most max_tokens={self.max_tokens}")
        _check(self.logit_bias is None or all(-100.0 <= v <= 100.0
                                              for v in self.logit_bias.values()),
               "logit_bias", self.logit_bias, "values must be in [-100, 100]")
        _check(self.allowed_token_ids is None or (
            bool(self.allowed_token_ids)
            and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids", self.allowed_token_ids, "must be a non-empty list of token ids")
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
               self.bad_words, "must be non-empty strings")
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs,
               "must be a StructuredOutputsParams (or a dict of its fields)")
        # best_of candidates are re-ranked every step: their news has no stable order.
        _check(not (self.output_kind is RequestOutputKind.DELTA and self.best_of > self.n
                    and not self.use_beam_search), "output_kind", self.output_kind,
               f"DELTA needs best_of equal to n={self.n}")

    def _ignore_sampling_knobs(self) -> None:
        """Beam search ranks by the model's own log-probabilities, so the knobs that
        reshape them for sampling are set to change nothing, as transformers ignores
        them with do_sample=False. One given is named in a warning: this runs once
        per SamplingParams, and a copy (dataclasses.replace) finds them neutral."""
        ignored = [f"{name}={getattr(self, name)!r}" for name, neutral in _NEUTRAL_KNOBS.items()
                   if getattr(self, name) is not None and getattr(self, name) != neutral]
        for name, neutral in _NEUTRAL_KNOBS.items():
            object.__setattr__(self, name, neutral)
        if ignored:
            logger.warning("use_beam_search=True ignores %s: beam search ranks the model's own "
                           "log-probabilities, as transformers' generate(num_beams=..., "
                           "do_sample=False) does", ", ".join(ignored))

    def _validate_beam_search(self) -> None:
        """Beam search ranks by the model's own log-probabilities: nothing may reshape them
        (the sampling knobs were set neutral above; penalties, stop strings and seed are
        refused)."""
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0)):
            _check(getattr(self, name) == neutral, name, getattr(self, name),
                   "penalties are not supported with use_beam_search=True")
        _check(not self.stop, "stop", self.stop,
               "stop strings are not supported with use_beam_search=True (use stop_token_ids)")
        for name, unset in (("logit_bias", None), ("allowed_token_ids", None),
                            ("min_tokens", 0), ("bad_words", ())):
            _check(getattr(self, name) in (unset, {}), name, getattr(self, name),
                   "not supported with use_beam_search=True: beams are ranked by the model's "
                   "own log-probabilities")
        _check(self.structured_outputs is None, "structured_outputs", self.structured_outputs,
               "not supported with use_beam_search=True: beam search ranks candidates by "
               "the model's own log-probabilities, not by what a grammar allows")
        _check(self.seed is None, "seed", self.seed,
               "beam search is deterministic; leave seed unset")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_logit_controls(self) -> bool:
        """logit_bias, allowed_token_ids or bad_words (min_tokens travels as the step's
        blocked ids)."""
        return bool(self.logit_bias or self.bad_words) or self.allowed_token_ids is not None

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def _token_bias(bias: dict) -> dict[int, float]:
    """{token id: bias}, ids given as ints or as their decimal strings (OpenAI's)."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError("logit_bias", f"logit_bias keys must be token ids, got "
                                             f"{key!r}") from None
        _check(token >= 0 and isinstance(value, (int, float)), "logit_bias", bias,
               "must map token ids to numbers")
        out[token] = float(value)
    return out


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise RequestError(name, f"SamplingParams.{name}={value!r}: {rule}")
