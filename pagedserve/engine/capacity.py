"""What a request may ask of an engine, and the KV memory it and the swap pool take.

The one home of these rules: the engine checks requests with them, and the
HTTP ingress refuses a request that cannot fit before it reaches a replica.
"""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.errors import RequestError
from pagedserve.math_utils import cdiv
from pagedserve.sampling_params import SamplingParams

DEFAULT_SWAP_BYTES = 4 * 2**30


def context_room(prompt_len: int, max_model_len: int, max_tokens: int | None = None,
                 min_room: int = 0) -> int:
    """The tokens a prompt leaves in the context for new ones: the one home of the rule.

    The prompt must leave `min_room` (0 offline, as vLLM's engine; the API asks
    for 1, as vLLM's server), and `max_tokens`, when given, must fit.
    Raises a RequestError blaming `prompt_token_ids` or `max_tokens`.
    """
    room = max_model_len - prompt_len
    if room < min_room or (max_tokens is not None and max_tokens > room):
        total = prompt_len + (max_tokens or 0)
        param = "prompt_token_ids" if room < min_room else "max_tokens"
        raise RequestError(param, f"This model's maximum context length is {max_model_len} "
                                  f"tokens. However, you requested {total} tokens "
                                  f"({prompt_len} in the prompt, {max_tokens or 0} in the "
                                  f"completion), over max_model_len={max_model_len}. Please "
                                  "reduce the length of the prompt or max_tokens.")
    return room


def max_new_tokens(prompt_len: int, params: SamplingParams, max_model_len: int) -> int:
    """`params.max_tokens`, or for None (up to the context limit) what the context
    leaves: max_model_len less the prompt, at least 1, as the HTTP API's null."""
    if params.max_tokens is not None:
        return params.max_tokens
    return max(max_model_len - prompt_len, 1)


def blocks_needed(prompt_len: int, params: SamplingParams, max_model_len: int,
                  block_size: int) -> int:
    """The most KV blocks a request holds at once.

    Its sequences share the prompt's full blocks; each holds its own copy of
    the rest (the prompt's partial block, copied on write, and its new tokens):

        prompt 140 tokens, blocks of 8, 8 new tokens, 4 beams:
        17 shared full blocks + 4 x (19 - 17) own blocks = 25
    """
    longest = min(prompt_len + max_new_tokens(prompt_len, params, max_model_len), max_model_len)
    shared = prompt_len // block_size
    assert params.best_of is not None  # SamplingParams.__post_init__ defaults it to n
    return shared + params.best_of * (cdiv(longest, block_size) - shared)


def swap_blocks(engine: EngineConfig, num_blocks: int, block_bytes: int) -> int:
    """Blocks of the CPU swap pool: swap_space GiB, or by default as many as the KV
    pool holds, within 4 GiB (vLLM's default swap space)."""
    if engine.swap_space is not None:
        return int(engine.swap_space * 2**30) // block_bytes
    return min(num_blocks, DEFAULT_SWAP_BYTES // block_bytes)
