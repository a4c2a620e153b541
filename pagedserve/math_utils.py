"""Integer arithmetic that several layers share."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """`a / b` rounded up, in integers: how many blocks of `b` hold `a` items."""
    return -(-a // b)
