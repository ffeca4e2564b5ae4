"""Reading a Redis stream whose entries each carry one text field: a run's log lines, a run's events."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from trainer_store.records import text

START_ID = "0-0"
BATCH = 200


@dataclass(frozen=True)
class StreamEntry:
    entry_id: str
    data: str


def read_after(
    client: redis.Redis, key: str, field: str, after_id: str, block_s: float | None
) -> list[StreamEntry]:
    """Up to BATCH entries after `after_id`; waits up to `block_s` in Redis for the first (None: at once)."""
    block = None if block_s is None else max(1, int(block_s * 1000))
    answer = client.xread({key: after_id}, block=block, count=BATCH)
    # XREAD answers [[stream, entries]] for the one stream asked about, or nothing after its timeout.
    streams = answer if isinstance(answer, list) else []
    return [entry for stream in streams for entry in entries(stream[1] if len(stream) == 2 else None, field)]


def entries(answer: object, field: str) -> list[StreamEntry]:
    """The entries of an XRANGE-shaped answer that carry `field`; anything else is skipped."""
    found: list[StreamEntry] = []
    for item in answer if isinstance(answer, list) else []:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
            fields = {text(name): value for name, value in item[1].items()}
            if field in fields:
                found.append(StreamEntry(text(item[0]), text(fields[field])))
    return found
