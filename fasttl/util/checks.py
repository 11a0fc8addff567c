"""Argument checks every layer repeats, written once: each raises the caller's error type with a
message naming the argument."""
from __future__ import annotations


def positive_int(name: str, value, error=ValueError, optional: bool = False):
    """`value` when it is an int >= 1 (True is not 1 here), or None when `optional`; else `error`
    naming `name`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name}: expected a positive integer, got {value!r}")
    return value
