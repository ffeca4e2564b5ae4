"""Typed reads of a Redis stream for tests: redis-py types entries loosely (optional, str or bytes)."""

from __future__ import annotations

import redis

from schemas.events import EVENTS_STREAM, NotAnEvent, TrainCompleted, TrainEvent, TrainFailed, decode_event
from scripts import devstack


def stream_fields(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    """Each entry's fields, oldest first, from a client that does not decode responses."""
    found: list[dict[bytes, bytes]] = []
    for _, fields in client.xrange(stream) or []:
        assert fields is not None
        found.append({_bytes(key): _bytes(value) for key, value in fields.items()})
    return found


def sent_events(client: redis.Redis) -> list[TrainEvent]:
    """Every event on the durable stream, oldest first; each must pass the strict decoder."""
    events: list[TrainEvent] = []
    for fields in stream_fields(client, EVENTS_STREAM):
        event = decode_event(fields[b"event"])
        assert not isinstance(event, NotAnEvent), event.reason
        events.append(event)
    return events


def events_through_the_end(client: redis.Redis, run_id: str, timeout_s: float = 30.0) -> list[TrainEvent]:
    """The run's events once its final one is on the stream. A worker records a run's end and then sends
    its event: a test that saw the record end waits for the event."""

    def ended() -> bool:
        return any(
            isinstance(event, (TrainCompleted, TrainFailed)) and event.run_id == run_id
            for event in sent_events(client)
        )

    devstack.wait_until(ended, timeout_s, f"the final event of run {run_id}")
    return [event for event in sent_events(client) if event.run_id == run_id]


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value
