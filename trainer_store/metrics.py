"""Counters that processes keep in Redis for the API's `/metrics`: one hash, one field per counter."""

from __future__ import annotations

from typing import Literal

import redis
import redis.asyncio as aioredis

# Each process adds to these in the pipeline that does the counted thing; `/metrics` reads the hash.
METRICS_KEY = "trainer:metrics"

Counter = Literal["events_published", "bot_dms_sent", "bot_dms_refused", "bot_dms_parked"]
COUNTERS: tuple[Counter, ...] = ("events_published", "bot_dms_sent", "bot_dms_refused", "bot_dms_parked")

Pipeline = redis.client.Pipeline | aioredis.client.Pipeline


def count(pipe: Pipeline, counter: Counter, by: int = 1) -> None:
    """Add to a counter as part of a pipeline the caller executes."""
    pipe.hincrby(METRICS_KEY, counter, by)
