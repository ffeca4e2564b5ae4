"""Helpers for reading typed values out of Redis hashes."""

from __future__ import annotations

import json
import re

# Ids become parts of Redis keys (`trainer:runs:<id>`, `trainer:runs:<id>:lease`): one with a `:`
# could name another record's key. Ours are hex; anything else names no record.
_RECORD_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def text(value: object) -> str:
    """A Redis reply as str: bytes from a raw client, str from a decoding one."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_record_id(value: str) -> bool:
    """Whether `value` can be the id of a record (a run, a corpus, a tokenizer); the others name none."""
    return _RECORD_ID.fullmatch(value) is not None


def decoded(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {text(key): text(value) for key, value in raw.items()}


def optional_float(raw: dict[str, str], name: str) -> float | None:
    value = raw.get(name)
    return float(value) if value else None


def json_object(raw: dict[str, str], name: str) -> dict[str, object] | None:
    value = raw.get(name)
    if not value:
        return None
    parsed: object = json.loads(value)
    return {str(k): v for k, v in parsed.items()} if isinstance(parsed, dict) else None


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
