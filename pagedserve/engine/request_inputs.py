"""A request's way in: its prompt as token ids, checked against what this engine
can ever serve, with its limits made explicit for the scheduler.

It reads only what is fixed once the engine is built (the model, the
scheduler's limits, the pool's size), so the async engine checks a request on
the caller's thread, before it reaches the step loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedserve.engine.capacity import blocks_needed, context_room, max_new_tokens
from pagedserve.errors import RequestError
from pagedserve.model.info import ModelInfo
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.beam_search import BeamSearch
from pagedserve.scheduler.config import SchedulerConfig

# A prompt: text, or {"prompt_token_ids": [...]}.
PromptInput = str | dict[str, Any]


class InputProcessor:
    def __init__(self, info: ModelInfo, limits: SchedulerConfig, *, block_size: int,
                 num_blocks: int, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.info = info
        self.limits = limits
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tokenizer = tokenizer

    def prompt_token_ids(self, prompt: PromptInput) -> list[int]:
        """A prompt's token ids: given, or from the tokenizer."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise RequestError("prompt", "a dict prompt needs the key 'prompt_token_ids'")
            return list(prompt["prompt_token_ids"])
        if not isinstance(prompt, str):
            raise RequestError("prompt", f"prompt must be a str or a dict with "
                                         f"'prompt_token_ids', got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise RequestError("prompt", "string prompts need a tokenizer; this engine was "
                                         "built with skip_tokenizer_init=True (pass "
                                         "{'prompt_token_ids': [...]})")
        return self.tokenizer(prompt).input_ids

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse a request this engine could never serve (RequestError naming the limit)."""
        info, engine_limits = self.info, self.limits
        if not prompt_token_ids:
            raise RequestError("prompt_token_ids", "prompt_token_ids: the prompt must have at "
                                                   "least one token")
        bad = next((t for t in prompt_token_ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise RequestError("prompt_token_ids", f"prompt_token_ids: token id {bad} is outside "
                                                   f"the vocabulary [0, {info.vocab_size})")
        context_room(len(prompt_token_ids), info.max_model_len)
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= info.vocab_size), None)
            if bad is not None:
                raise RequestError(name, f"{name}: token id {bad} is outside the vocabulary "
                                         f"[0, {info.vocab_size})")
        best_of = params.best_of
        assert best_of is not None  # SamplingParams.__post_init__ defaults it to n
        if best_of > engine_limits.max_num_seqs:
            raise RequestError("best_of", f"best_of={params.best_of} exceeds max_num_seqs="
                                          f"{engine_limits.max_num_seqs}")
        if params.use_beam_search and best_of > engine_limits.max_num_batched_tokens:
            raise RequestError("best_of", f"best_of={params.best_of} beams exceed "
                                          f"max_num_batched_tokens="
                                          f"{engine_limits.max_num_batched_tokens}: every beam "
                                          "takes a token each step")
        if params.bad_words and self.tokenizer is None:
            raise RequestError("bad_words", "bad_words need a tokenizer; this engine was built "
                                            "with skip_tokenizer_init=True")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer; this engine was built "
                                       "with skip_tokenizer_init=True (use stop_token_ids instead)")
        needed = blocks_needed(len(prompt_token_ids), params, info.max_model_len,
                               self.block_size)
        new_tokens = max_new_tokens(len(prompt_token_ids), params, info.max_model_len)
        if needed > self.num_blocks:
            raise RequestError("max_tokens", f"request needs up to {needed} KV blocks (a "
                                             f"{len(prompt_token_ids)}-token prompt, "
                                             f"{params.best_of} sequences of up to "
                                             f"{new_tokens} new tokens), more than the "
                                             f"pool's {self.num_blocks}")

    def with_max_tokens(self, prompt_len: int, params: SamplingParams) -> SamplingParams:
        """`params` with a number for max_tokens: None means up to the context limit,
        and the scheduler needs a number."""
        if params.max_tokens is not None:
            return params
        return dataclasses.replace(
            params, max_tokens=max_new_tokens(prompt_len, params, self.info.max_model_len))

    def with_bad_words(self, params: SamplingParams) -> SamplingParams:
        """`params` with its bad_words as token sequences: each word alone and after a
        space (a word inside the text), as vLLM tokenizes them."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        assert self.tokenizer is not None  # validate() refuses bad_words without one
        sequences: list[tuple[int, ...]] = []
        for word in params.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return dataclasses.replace(params, bad_words_token_ids=tuple(sequences))

    def beam_search(self, prompt_len: int, params: SamplingParams) -> BeamSearch | None:
        """The request's beam search (None without use_beam_search); `params` has
        its max_tokens (`with_max_tokens`)."""
        if not params.use_beam_search:
            return None
        assert params.max_tokens is not None and params.best_of is not None
        eos = set() if params.ignore_eos else set(self.info.eos_token_ids)
        return BeamSearch(
            num_beams=params.best_of, num_return_sequences=params.n,
            length_penalty=params.length_penalty, early_stopping=params.early_stopping,
            eos_token_ids=frozenset(eos | set(params.stop_token_ids)),
            max_new_tokens=max(1, min(params.max_tokens,
                                      self.info.max_model_len - prompt_len)))
