"""The OpenAI-compatible wire format, outbound: responses, stream chunks and logprobs.

Builds OpenAI's JSON from the engine's cumulative `RequestOutput`s. Where
OpenAI is silent we follow vLLM's OpenAI server ("abort" finish reason,
logprob token strings, -inf logprobs clamped to MIN_LOGPROB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedserve.outputs import CompletionOutput, RequestOutput

# JSON has no -inf; vLLM reports impossible tokens at this floor instead.
MIN_LOGPROB = -9999.0
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


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}
        for name in names]}


class _TokenText:
    """Token id -> its text, decoded alone (as vLLM reports logprob tokens), memoized."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def completion_logprobs(entries: list[dict[int, float]], tokenizer: Any,
                        text_offset: int = 0) -> dict:
    """The legacy completions format for these tokens.

    Each engine entry holds the sampled token first, then the `logprobs` most
    likely ones; OpenAI reports them all (so up to `logprobs + 1` per step).
    `text_offset` is where the first token starts in the choice's text; in a
    stream, pass `StreamState.text_offset(index)`.
    """
    token_text = _TokenText(tokenizer)
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        sampled_id, sampled_logprob = next(iter(entry.items()))
        token = token_text(sampled_id)
        tokens.append(token)
        token_logprobs.append(max(sampled_logprob, MIN_LOGPROB))
        top: dict[str, float] = {}
        for token_id, logprob in entry.items():  # two ids may decode alike: keep the first
            top.setdefault(token_text(token_id), max(logprob, MIN_LOGPROB))
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(entries: list[dict[int, float]], tokenizer: Any, top_logprobs: int) -> dict:
    """The chat format: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    token_text = _TokenText(tokenizer)

    def item(token_id: int, logprob: float) -> dict:
        token = token_text(token_id)
        return {"token": token, "logprob": max(logprob, MIN_LOGPROB),
                "bytes": list(token.encode("utf-8"))}

    content = []
    for entry in entries:
        sampled = next(iter(entry.items()))
        # The sampled token may sit outside the top k: rank before cutting.
        ranked = sorted(entry.items(), key=lambda pair: pair[1], reverse=True)[:top_logprobs]
        content.append({**item(*sampled), "top_logprobs": [item(*pair) for pair in ranked]})
    return {"content": content}


def _sorted(outputs: list[CompletionOutput]) -> list[CompletionOutput]:
    return sorted(outputs, key=lambda output: output.index)


def _entries(output: CompletionOutput) -> list[dict[int, float]]:
    if output.logprobs is None:
        raise ValueError(f"logprobs were requested but choice {output.index} has none")
    return output.logprobs


def completion_response(request_id: str, model: str, created: int,
                        outputs: list[RequestOutput], tokenizer: Any,
                        logprobs: int | None) -> dict:
    """All prompts' finished outputs as one response; choice index = prompt * n + output."""
    choices = []
    for prompt_index, request_output in enumerate(outputs):
        n = len(request_output.outputs)
        for output in _sorted(request_output.outputs):
            choices.append({
                "index": prompt_index * n + output.index,
                "text": output.text,
                "logprobs": (None if logprobs is None
                             else completion_logprobs(_entries(output), tokenizer)),
                "finish_reason": finish_reason(output.finish_reason),
            })
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    completion_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, created: int, index: int, text_delta: str,
                     finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text_delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, created: int, object_name: str,
                usage: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    return {"id": request_id, "object": object_name, "created": created, "model": model,
            "choices": [], "usage": usage}


def chat_response(request_id: str, model: str, created: int, output: RequestOutput,
                  tokenizer: Any, top_logprobs: int | None) -> dict:
    """`top_logprobs` None means logprobs were not requested (see num_top_logprobs)."""
    choices = [{
        "index": choice.index,
        "message": {"role": "assistant", "content": choice.text},
        "logprobs": (None if top_logprobs is None
                     else chat_logprobs(_entries(choice), tokenizer, top_logprobs)),
        "finish_reason": finish_reason(choice.finish_reason),
    } for choice in _sorted(output.outputs)]
    completion_tokens = sum(len(choice.token_ids) for choice in output.outputs)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(len(output.prompt_token_ids), completion_tokens)}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None, logprobs: dict | None = None) -> dict:
    """One streamed chat choice update. Send delta {"role": "assistant", "content": ""} first."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}


# ---------------------------------------------------------------------------- streaming

Delta = tuple[int, str, list[dict[int, float]] | None, str | None]


class StreamState:
    """What one request has already streamed, per choice, so each update sends only news.

    The engine's text can shrink once: a stop string is cut off when it
    completes. So, with stop strings, the last `max(len(stop)) - 1` characters
    stay unsent until more text arrives or the choice finishes; sent text is
    then always a prefix of the final text.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text_sent: dict[int, int] = {}
        self.last_delta_start: dict[int, int] = {}
        self.logprobs_sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def deltas(self, output: RequestOutput) -> list[Delta]:
        """(choice index, new text, new logprob entries or None, OpenAI finish_reason
        if it just finished) for every choice with something new."""
        deltas = []
        for choice in _sorted(output.outputs):
            index = choice.index
            if index in self.finished:
                continue
            sent = self.text_sent.get(index, 0)
            end = len(choice.text) if choice.finished else len(choice.text) - self.hold_back
            text = choice.text[sent:end] if end > sent else ""
            self.text_sent[index] = sent + len(text)
            self.last_delta_start[index] = sent
            entries = None
            if choice.logprobs is not None:
                entries = choice.logprobs[self.logprobs_sent.get(index, 0):]
                self.logprobs_sent[index] = len(choice.logprobs)
            reason = finish_reason(choice.finish_reason)
            if reason is not None:
                self.finished.add(index)
            if text or entries or reason is not None:
                deltas.append((index, text, entries, reason))
        return deltas

    def text_offset(self, index: int) -> int:
        """Where the text of choice `index`'s latest delta starts (legacy logprobs' text_offset)."""
        return self.last_delta_start.get(index, 0)
