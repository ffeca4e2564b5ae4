"""Event delivery: publish on `trainer:events`, append to the global stream and the run's own; never raise."""

from __future__ import annotations

import logging

import redis

from schemas.events import EVENT_FIELD, EVENTS_CHANNEL, EVENTS_STREAM, TrainEvent, encode_event
from trainer_store.metrics import count
from trainer_store.outages import END_PATIENCE_S, REDIS_AWAY, patiently
from trainer_store.runs import FINISHED_RUN_TTL_S, RUN_EVENTS_MAXLEN, run_events_key, run_key

log = logging.getLogger(__name__)

# The run's last event on its record, and the event on the run's own stream (its history, for
# GET /runs/{run_id}/events, outliving the run as its record does), only while the record exists:
# never recreate a deleted run.
_REMEMBER_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_event', ARGV[1], 'last_seq', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""


class EventBus:
    """Best effort on the hot path: a Redis error is logged and training goes on; final events persist."""

    def __init__(self, client: redis.Redis, stream_maxlen: int) -> None:
        self._redis = client
        self._stream_maxlen = stream_maxlen
        self._remember = client.register_script(_REMEMBER_EVENT)

    def send(self, event: TrainEvent) -> bool:
        payload = _payload(event)
        if payload is None:
            return False
        try:
            self._write(event, payload)
        except redis.RedisError as exc:
            _log_undelivered(event, exc)
            return False
        return True

    def deliver(self, event: TrainEvent, patience_s: float = END_PATIENCE_S) -> bool:
        """Send a run's final event, trying again while Redis is away, for up to `patience_s`.

        A try whose answer was lost may have been written already: the bot drops a repeated event_id.
        """
        payload = _payload(event)
        if payload is None:
            return False
        try:
            patiently(
                lambda: self._write(event, payload), patience_s, lambda exc: _log_undelivered(event, exc)
            )
        except REDIS_AWAY as exc:
            log.error(
                "event %s for run %s not delivered within %g s (%s): its user is not told",
                event.type,
                event.run_id,
                patience_s,
                exc,
            )
            return False
        except redis.RedisError as exc:
            # Redis answered and refused (a wrong type, a script error): asking again changes nothing.
            log.error("event %s for run %s refused by Redis: %s", event.type, event.run_id, exc)
            return False
        return True

    def _write(self, event: TrainEvent, payload: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.publish(EVENTS_CHANNEL, payload)
        # Approximate trimming keeps XADD O(1); the stream holds about the newest `stream_maxlen` events.
        pipe.xadd(EVENTS_STREAM, {EVENT_FIELD: payload}, maxlen=self._stream_maxlen, approximate=True)
        self._remember(
            keys=[run_key(event.run_id), run_events_key(event.run_id)],
            args=[payload, event.seq or 0, RUN_EVENTS_MAXLEN, EVENT_FIELD, FINISHED_RUN_TTL_S],
            client=pipe,
        )
        count(pipe, "events_published")
        pipe.execute()
        log.info("event %s", payload)


def _log_undelivered(event: TrainEvent, exc: redis.RedisError) -> None:
    log.warning("event %s for run %s not delivered: %s", event.type, event.run_id, exc)


def _payload(event: TrainEvent) -> str | None:
    try:
        return encode_event(event)
    except ValueError as exc:  # a NaN or infinity has no JSON form
        log.error("event %s for run %s not encodable: %s", event.type, event.run_id, exc)
        return None
