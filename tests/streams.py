"""Typed reads of a Redis stream for tests: redis-py types entries loosely (optional, str or bytes)."""

from __future__ import annotations

import redis


def stream_fields(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    """Each entry's fields, oldest first, from a client that does not decode responses."""
    found: list[dict[bytes, bytes]] = []
    for _, fields in client.xrange(stream) or []:
        assert fields is not None
        found.append({_bytes(key): _bytes(value) for key, value in fields.items()})
    return found


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value
