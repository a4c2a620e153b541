"""Prefix-cache keys of full KV blocks, shared by the block manager and the router."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockKey = bytes


def block_key(parent: BlockKey | None, token_ids: Sequence[int], extra_key: str | None) -> BlockKey:
    """The prefix-cache key of a full block: SHA-256 over its parent's key, tokens, extra key."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        digest.update(b"\x00" + extra_key.encode())
    return digest.digest()
