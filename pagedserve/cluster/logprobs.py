"""Token logprobs in OpenAI's two formats: legacy completions and chat.

A token's text is decoded alone, as vLLM reports it, so a token holding part
of a UTF-8 character reads as U+FFFD. Its `bytes` (chat) are the token's own
bytes, exactly; its `text_offset` (completions) is where its contribution
starts in the choice's text, from the same incremental decoding that made the
text, so a partial character adds nothing until the token that completes it:

    "🚀" as byte-level tokens   F0 9F | 9A | 80     -> text_offset 0, 1, 1 (in "x🚀": 1 char)
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Any

from tokenizers.decoders import DecodeStream

# JSON has no -inf; vLLM reports impossible tokens at this floor instead.
MIN_LOGPROB = -9999.0
# DecodeStream needs only a few tokens of context to place a leading space.
_CONTEXT = 8
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback

# (token id, its {token_id: logprob} entry or None): the entry of a sampled token
# holds it first; a prompt token's entry holds the prompt's token first.
Entry = dict[int, float]


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenStrings:
    """Token ids as the API reports them (text alone, exact bytes), memoized.

    `as_token_ids` is vLLM's `return_tokens_as_token_ids`: text "token_id:<id>".
    """

    def __init__(self, tokenizer: Any, as_token_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and all(char in self._byte_decoder for char in piece):
            return [self._byte_decoder[char] for char in piece]
        if match := _BYTE_TOKEN.fullmatch(piece):
            return [int(match.group(1), 16)]
        return list(piece.replace("\u2581", " ").encode("utf-8"))  # SentencePiece's space

    @cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        return decoder.get("type") == "ByteLevel"

    @cached_property
    def _byte_decoder(self) -> dict[str, int]:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        return {char: byte for byte, char in bytes_to_unicode().items()}


class TextOffsets:
    """Where each token's text starts in the text the tokens decode to, token by token."""

    def __init__(self, tokenizer: Any, start: int = 0, context: list[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=list(context)[-_CONTEXT:],
                                    skip_special_tokens=skip_special_tokens)
        self.end = start

    def take(self, token_id: int) -> int:
        start = self.end
        self.end += len(self._stream.step(self._tokenizer, token_id) or "")
        return start


def completion_logprobs(tokens: list[tuple[int, Entry | None]], strings: TokenStrings,
                        offsets: TextOffsets) -> dict:
    """The legacy completions format: per token its text, logprob, top alternatives
    and text offset. An entry holds the token and up to `logprobs` alternatives, so
    OpenAI reports up to `logprobs + 1` per token; the prompt's first has none (null)."""
    texts, token_logprobs, top_logprobs, text_offsets = [], [], [], []
    for token_id, entry in tokens:
        texts.append(strings.text(token_id))
        text_offsets.append(offsets.take(token_id))
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(clamp(entry[token_id]))
        top: dict[str, float] = {}
        for other, logprob in entry.items():  # two ids may decode alike: keep the first
            top.setdefault(strings.text(other), clamp(logprob))
        top_logprobs.append(top)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offsets}


def sampled(entries: list[Entry]) -> list[tuple[int, Entry]]:
    """Generated tokens' entries as (token, entry): the sampled token is each one's first key."""
    return [(next(iter(entry)), entry) for entry in entries]


def prompt(token_ids: list[int], entries: list[Entry | None]) -> list[tuple[int, Entry | None]]:
    return list(zip(token_ids, entries, strict=True))


def chat_logprobs(entries: list[Entry], strings: TokenStrings, top_logprobs: int) -> dict:
    """The chat format: per token its text, logprob, UTF-8 bytes and the top alternatives."""

    def item(token_id: int, logprob: float) -> dict:
        return {"token": strings.text(token_id), "logprob": clamp(logprob),
                "bytes": strings.bytes(token_id)}

    content = []
    for entry in entries:
        token = next(iter(entry.items()))
        # The sampled token may sit outside the top k: rank before cutting.
        ranked = sorted(entry.items(), key=lambda pair: pair[1], reverse=True)[:top_logprobs]
        content.append({**item(*token), "top_logprobs": [item(*pair) for pair in ranked]})
    return {"content": content}


def vllm_prompt_logprobs(token_ids: list[int], entries: list[Entry | None], num_top: int,
                         strings: TokenStrings) -> list[dict | None]:
    """vLLM's `prompt_logprobs` field: per prompt token {id: {logprob, rank, decoded_token}}.

    Each entry holds the prompt's token, then the `num_top` most likely ones
    (the prompt's token counted once when it is one of them). Ranks are known
    within the top (1 = most likely); a prompt token outside it has rank null.
    """
    result: list[dict | None] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            result.append(None)
            continue
        in_top = len(entry) <= num_top
        ranked = sorted(entry.items(), key=lambda pair: pair[1], reverse=True)
        result.append({str(tid): {"logprob": clamp(logprob),
                                  "rank": rank if tid != token_id or in_top else None,
                                  "decoded_token": strings.text(tid)}
                       for rank, (tid, logprob) in enumerate(ranked, start=1)})
    return result
