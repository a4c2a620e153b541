"""The OpenAI-compatible wire format, outbound: responses, stream chunks and usage.

Builds OpenAI's JSON from the engine's `RequestOutput`s: whole responses from
cumulative ones, stream chunks from each update's news (StreamNews); logprobs
are written by cluster/logprobs.py. Where OpenAI is silent we follow vLLM's
OpenAI server ("abort" finish reason, `root` and `max_model_len` in model
cards, `prompt_logprobs`, usage in every chunk with `continuous_usage_stats`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from pagedserve.cluster import logprobs as lp
from pagedserve.cluster.tools import ToolCalling
from pagedserve.engine.output_kinds import DeltaTracker
from pagedserve.outputs import CompletionOutput, RequestOutput

OWNED_BY = "pagedserve"

# ---------------------------------------------------------------------------- responses


def finish_reason(ours: str | None) -> str | None:
    """Ours -> OpenAI's. "abort" has no OpenAI counterpart; vLLM passes it through."""
    if ours not in (None, "stop", "length", "abort"):
        raise ValueError(f"unknown finish_reason={ours!r}")
    return ours


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class TokenCounts:
    """A request's tokens so far: its prompt's, and each choice's generated ones."""

    prompt: int
    generated: Mapping[int, int]  # by choice index

    @classmethod
    def of(cls, output: RequestOutput) -> TokenCounts:
        """The counts of a cumulative output."""
        return cls(len(output.prompt_token_ids),
                   {choice.index: len(choice.token_ids) for choice in output.outputs})


def usage_of(counts: Sequence[TokenCounts], generated: bool = True,
             index: int | None = None) -> dict:
    """The usage of requests (every response, stream and gRPC reply counts here):
    their prompts' tokens, and the tokens of their choices, or only of the choice
    `index`. `generated` False (echo with max_tokens 0): no completion tokens."""
    prompt_tokens = sum(count.prompt for count in counts)
    completion_tokens = sum(tokens for count in counts for choice, tokens in
                            count.generated.items()
                            if index is None or choice == index) if generated else 0
    return usage(prompt_tokens, completion_tokens)


def model_list(names: list[str], created: int, root: str | None = None,
               max_model_len: int | None = None,
               adapters: list[tuple[str, str]] = ()) -> dict:
    """Model cards; `root` is where the model's config and tokenizer are (vLLM's field,
    where benchmark clients look for the tokenizer). Each LoRA adapter (name, path)
    follows, its `parent` the first model, as vLLM lists them."""
    cards = [{"id": name, "object": "model", "created": created, "owned_by": OWNED_BY,
              "root": root, "parent": None, "max_model_len": max_model_len}
             for name in names]
    cards += [{"id": name, "object": "model", "created": created, "owned_by": OWNED_BY,
               "root": path, "parent": names[0], "max_model_len": max_model_len}
              for name, path in adapters]
    return {"object": "list", "data": cards}


@dataclass(frozen=True)
class CompletionFormat:
    """How a completion request's choices are written."""

    logprobs: int | None = None  # legacy logprobs with this many alternatives
    echo: bool = False  # the prompt comes first, in the text and the logprobs
    generate: bool = True  # False (echo with max_tokens 0): the prompt only
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs` field, this many alternatives
    skip_special_tokens: bool = True  # as the engine decoded the text
    # Echoed text prompts skip the special tokens the tokenizer added (BOS), so
    # their offsets match the client's text; echoed token prompts are decoded whole.
    prompt_skip_special_tokens: bool = True
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids


def _sorted(outputs: list[CompletionOutput]) -> list[CompletionOutput]:
    return sorted(outputs, key=lambda output: output.index)


def _entries(output: CompletionOutput) -> list[dict[int, float]]:
    if output.logprobs is None:
        raise ValueError(f"logprobs were requested but choice {output.index} has none")
    return output.logprobs


def _prompt_entries(output: RequestOutput) -> list[dict[int, float] | None]:
    if output.prompt_logprobs is None:
        raise ValueError(f"prompt logprobs were requested but {output.request_id} has none")
    return output.prompt_logprobs


def echo_text(output: RequestOutput, prompt_text: str, fmt: CompletionFormat,
              strings: lp.TokenStrings) -> tuple[str, dict | None, lp.TextOffsets | None]:
    """The echoed prompt: its text, its legacy logprobs (when asked), and the offsets
    object that continues after it."""
    offsets = None
    logprobs = None
    if fmt.logprobs is not None:
        prompt_offsets = lp.TextOffsets(strings.tokenizer,
                                        skip_special_tokens=fmt.prompt_skip_special_tokens)
        logprobs = lp.completion_logprobs(
            lp.prompt(output.prompt_token_ids, _prompt_entries(output)), strings, prompt_offsets)
        offsets = output_offsets(output, fmt, strings, start=len(prompt_text))
    return prompt_text, logprobs, offsets


def output_offsets(output: RequestOutput, fmt: CompletionFormat, strings: lp.TokenStrings,
                   start: int) -> lp.TextOffsets:
    """Text offsets of generated tokens, decoded as the engine decoded them."""
    return lp.TextOffsets(strings.tokenizer, start=start, context=output.prompt_token_ids,
                          skip_special_tokens=fmt.skip_special_tokens)


def completion_choice(index: int, output: RequestOutput, choice: CompletionOutput,
                      prompt_text: str, fmt: CompletionFormat, strings: lp.TokenStrings) -> dict:
    text, logprobs, offsets = "", None, None
    if fmt.echo:
        text, logprobs, offsets = echo_text(output, prompt_text, fmt, strings)
    if fmt.generate:
        text += choice.text
        if fmt.logprobs is not None:
            offsets = offsets or output_offsets(output, fmt, strings, start=0)
            generated = lp.completion_logprobs(lp.sampled(_entries(choice)), strings, offsets)
            logprobs = generated if logprobs is None else {
                key: logprobs[key] + generated[key] for key in logprobs}
    entry = {"index": index, "text": text, "logprobs": logprobs,
             "finish_reason": finish_reason(choice.finish_reason)}
    if fmt.prompt_logprobs is not None:
        entry["prompt_logprobs"] = lp.vllm_prompt_logprobs(
            output.prompt_token_ids, _prompt_entries(output), fmt.prompt_logprobs, strings)
    return entry


def completion_response(request_id: str, model: str, created: int,
                        outputs: list[RequestOutput], prompt_texts: list[str], tokenizer: Any,
                        fmt: CompletionFormat) -> dict:
    """All prompts' finished outputs as one response; choice index = prompt * n + output."""
    strings = lp.TokenStrings(tokenizer, fmt.tokens_as_ids)
    choices = []
    for prompt_index, (output, prompt_text) in enumerate(zip(outputs, prompt_texts, strict=True)):
        n = len(output.outputs)
        for choice in _sorted(output.outputs):
            choices.append(completion_choice(prompt_index * n + choice.index, output, choice,
                                             prompt_text, fmt, strings))
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices,
            "usage": usage_of([TokenCounts.of(output) for output in outputs], fmt.generate)}


def chat_response(request_id: str, model: str, created: int, output: RequestOutput,
                  tokenizer: Any, top_logprobs: int | None, tokens_as_ids: bool = False,
                  tool_calling: ToolCalling | None = None) -> dict:
    """`top_logprobs` None means logprobs were not requested (see num_top_logprobs);
    with `tool_calling`, each choice's text is read for tool calls."""
    strings = lp.TokenStrings(tokenizer, tokens_as_ids)
    choices = []
    for choice in _sorted(output.outputs):
        message, reason = {"role": "assistant", "content": choice.text}, finish_reason(
            choice.finish_reason)
        if tool_calling is not None:
            message, reason = tool_calling.message(choice.text, reason)
        choices.append({
            "index": choice.index, "message": message,
            "logprobs": (None if top_logprobs is None
                         else lp.chat_logprobs(_entries(choice), strings, top_logprobs)),
            "finish_reason": reason})
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_of([TokenCounts.of(output)])}


# ---------------------------------------------------------------------------- streaming

_COMPACT = (",", ":")


def _json(value: Any) -> str:
    """`value` as JSON; None and strings, a stream's usual values, without the encoder."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    return json.dumps(value, separators=_COMPACT)


class Chunks:
    """A stream's server-sent events, encoded as they go.

    The fields every chunk repeats (id, object, created, model) are encoded once
    per stream; a chunk adds its one choice, written field by field, and, with
    continuous usage stats, its usage. At a GPU's token rate building each
    chunk as a dict for json.dumps was a tenth of the ingress's CPU
    (BENCHMARKS.md, "Keeping up with a GPU"). Chat chunks: send delta
    {"role": "assistant", "content": ""} first.
    """

    def __init__(self, request_id: str, model: str, created: int, object_name: str) -> None:
        envelope = json.dumps({"id": request_id, "object": object_name, "created": created,
                               "model": model}, separators=_COMPACT)
        self._head = f'data: {envelope[:-1]},"choices":['

    def completion(self, index: int, text: str, finish_reason: str | None,
                   logprobs: dict | None = None, usage: dict | None = None) -> str:
        return self._event(f'{{"index":{index},"text":{_json(text)},"logprobs":{_json(logprobs)},'
                           f'"finish_reason":{_json(finish_reason)}}}', usage)

    def chat(self, index: int, delta: dict, finish_reason: str | None,
             logprobs: dict | None = None, usage: dict | None = None) -> str:
        content = delta.get("content")
        encoded = (f'{{"content":{_json(content)}}}' if len(delta) == 1 and
                   isinstance(content, str) else _json(delta))
        return self._event(f'{{"index":{index},"delta":{encoded},"logprobs":{_json(logprobs)},'
                           f'"finish_reason":{_json(finish_reason)}}}', usage)

    def usage(self, usage: dict) -> str:
        """The last chunk with stream_options.include_usage: no choices, only usage."""
        return self._event("", usage)

    def _event(self, choice: str, usage: dict | None) -> str:
        tail = "]}" if usage is None else f'],"usage":{_json(usage)}}}'
        return f"{self._head}{choice}{tail}\n\n"


Delta = tuple[int, str, list[dict[int, float]] | None, str | None]


class StreamState:
    """What one request has already streamed, per choice, cut from cumulative outputs.

    The engine's delta tracking (engine/output_kinds.py) does the work, holding
    back text that may still become a stop string; this gives its news as
    OpenAI's stream needs it.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._tracker = DeltaTracker(stop)

    def deltas(self, output: RequestOutput) -> list[Delta]:
        """(choice index, new text, new logprob entries or None, OpenAI finish_reason
        if it just finished) for every choice with new text, logprobs or an end."""
        return [(news.index, news.text, news.logprobs, finish_reason(news.finish_reason))
                for news in self._tracker.delta(output).outputs
                if news.text or news.logprobs or news.finished]


@dataclass(frozen=True)
class ChoiceNews:
    """What a stream writer sends of one choice in one update."""

    index: int
    text: str
    token_ids: list[int]  # every token since the choice was last sent
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # OpenAI's, once: in the update where the choice ended


class StreamNews:
    """One streamed request's news, update by update, as its writers send it.

    A choice is sent when it has new text, logprobs or an end; its token ids
    wait for that. Most requests cross from the replica as news already
    (cluster/channel.py's crosses_as_deltas), with text that may still become a stop
    string held back by the engine, and pass through here as they are. A
    request with best_of > n crosses cumulative: the replica re-ranks its
    candidates every step, so the n it shows can change. Only those are cut
    here, from the output so far, holding back for `stop` (StreamState).
    """

    def __init__(self, first: RequestOutput, news: bool, stop: Sequence[str]) -> None:
        self._state = None if news else StreamState(stop)
        self._prompt_tokens = len(first.prompt_token_ids)
        self._generated: dict[int, int] = {}  # tokens so far, by choice index
        self._unsent: dict[int, list[int]] = {}  # news: token ids not sent yet, by choice
        self._finished: set[int] = set()  # news: choices whose end was sent
        self._tokens_sent: dict[int, int] = {}  # cumulative: token ids sent, by choice

    @property
    def counts(self) -> TokenCounts:
        """The request's tokens as of the last update."""
        return TokenCounts(self._prompt_tokens, self._generated)

    def update(self, output: RequestOutput) -> list[ChoiceNews]:
        """The choices `output` has news of, in index order."""
        if self._state is not None:
            return self._cut(output)
        sent = []
        for choice in sorted(output.outputs, key=lambda c: c.index):
            index = choice.index
            self._generated[index] = self._generated.get(index, 0) + len(choice.token_ids)
            if index in self._finished:
                continue
            unsent = self._unsent.setdefault(index, [])
            unsent.extend(choice.token_ids)
            if not (choice.text or choice.logprobs or choice.finished):
                continue
            if choice.finished:
                self._finished.add(index)
            sent.append(ChoiceNews(index, choice.text, self._unsent.pop(index),
                                   choice.logprobs, finish_reason(choice.finish_reason)))
        return sent

    def _cut(self, output: RequestOutput) -> list[ChoiceNews]:
        by_index = {choice.index: choice for choice in output.outputs}
        self._generated = {index: len(choice.token_ids) for index, choice in by_index.items()}
        sent = []
        for index, text, logprobs, finish in self._state.deltas(output):
            token_ids = by_index[index].token_ids
            sent.append(ChoiceNews(index, text, token_ids[self._tokens_sent.get(index, 0):],
                                   logprobs, finish))
            self._tokens_sent[index] = len(token_ids)
        return sent
