"""Typed reads of the JSON results the worker writes into job records; anything mistyped reads as None."""

from __future__ import annotations

from collections.abc import Mapping


def number_or_none(result: Mapping[str, object] | None, name: str) -> float | None:
    value = (result or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def integer_or_none(result: Mapping[str, object] | None, name: str) -> int | None:
    value = (result or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_or_none(result: Mapping[str, object] | None, name: str) -> str | None:
    value = (result or {}).get(name)
    return value if isinstance(value, str) else None
