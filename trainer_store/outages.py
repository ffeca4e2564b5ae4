"""Waiting out a Redis that is away: a restart or failover takes seconds to a minute."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

# How long a run's end (its record, then its final event) is tried again while Redis is away: its
# user waits for that one event. The pause between tries doubles up to the last.
END_PATIENCE_S = 300.0
FIRST_PAUSE_S = 0.25
LONGEST_PAUSE_S = 5.0
# What a Redis that is away, restarting or failing over raises; any other error is Redis refusing.
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

T = TypeVar("T")


def patiently(call: Callable[[], T], patience_s: float, on_away: Callable[[redis.RedisError], None]) -> T:
    """Call until Redis answers, for up to `patience_s`; then the last REDIS_AWAY error is raised.

    Any other Redis error is raised at once: asking again changes nothing.
    """
    deadline = time.monotonic() + patience_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            return call()
        except REDIS_AWAY as exc:
            if time.monotonic() + pause > deadline:
                raise
            on_away(exc)
        time.sleep(pause)
        pause = min(2 * pause, LONGEST_PAUSE_S)
