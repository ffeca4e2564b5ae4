"""A run's log, read from its stream in Redis: the last lines as text, or followed as server-sent events.

Any API replica serves any run: the lines live in Redis, written there by whichever worker trains it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import redis
from flask import Response
from flask_smorest import Blueprint
from marshmallow import RAISE

from schemas.api import LogQuerySchema
from trainer_api.services import run_or_404, services
from trainer_api.sse import SETTLE_S, Follow, follow, follow_response
from trainer_store import runlog, streams
from trainer_store.runs import RunStore
from trainer_store.streams import StreamEntry

blp = Blueprint("logs", __name__, url_prefix="/runs", description="Run logs")

TEXT_RESPONSE = {
    "200": {"description": "One log line a line.", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
STREAM_RESPONSE = {
    "200": {
        "description": "`data:` events, one log line each, then `event: end` once the run has finished.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@blp.route("/<string:run_id>/logs")
@blp.arguments(LogQuerySchema(), location="query", unknown=RAISE)
@blp.doc(responses=TEXT_RESPONSE)
def run_log(query: dict[str, int], run_id: str) -> Response:
    """The last `tail` lines the worker logged for the run (empty before it starts)."""
    run_or_404(run_id)
    entries = runlog.tail(services().redis, run_id, query["tail"])
    return Response("".join(f"{format_record(entry.data)}\n" for entry in entries), mimetype="text/plain")


@blp.route("/<string:run_id>/logs/stream")
@blp.arguments(LogQuerySchema(), location="query", unknown=RAISE)
@blp.doc(responses=STREAM_RESPONSE)
def stream_run_log(query: dict[str, int], run_id: str) -> Response:
    """The last `tail` lines, then each new one as it is written, until the run has finished."""
    run_or_404(run_id)
    found = services()
    return follow_response(
        log_follow(found.redis, run_id, query["tail"], lambda: run_finished(found.store, run_id)),
        time.monotonic,
    )


def run_finished(store: RunStore, run_id: str) -> bool:
    record = store.get(run_id)
    return record is None or record.is_terminal


def format_record(raw: str) -> str:
    """`2026-11-28T15:00:00Z INFO logger: message` from one JSON line; other text as it is."""
    try:
        record: object = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(record, dict) or not isinstance(record.get("ts"), (int, float)):
        return raw
    when = datetime.fromtimestamp(float(record["ts"]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{when} {record.get('level', '')} {record.get('logger', '')}: {record.get('message', '')}"


def formatted(entries: list[StreamEntry]) -> list[StreamEntry]:
    return [StreamEntry(entry.entry_id, format_record(entry.data)) for entry in entries]


def log_follow(client: redis.Redis, run_id: str, tail: int, finished: Callable[[], bool]) -> Follow:
    """The last `tail` lines first, then the lines after them, each shown as text; no ids."""
    first = formatted(runlog.tail(client, run_id, tail))
    return Follow(
        read_after=lambda after_id, block_s: formatted(runlog.read_after(client, run_id, after_id, block_s)),
        finished=finished,
        after_id=first[-1].entry_id if first else streams.START_ID,
        first=tuple(first),
        settle_s=SETTLE_S,
    )


def follow_log(
    client: redis.Redis,
    run_id: str,
    tail: int,
    finished: Callable[[], bool],
    block_s: float,
    keepalive_s: float,
    clock: Callable[[], float],
) -> Iterator[str]:
    """Server-sent events: the last `tail` lines, then new ones as Redis hands them over, then `end`
    once the run has finished."""
    return follow(log_follow(client, run_id, tail, finished), block_s, keepalive_s, clock)
