"""A run's log: the last lines as text, or followed live as server-sent events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from flask import Response, current_app, stream_with_context
from flask_smorest import Blueprint
from marshmallow import RAISE

from schemas.api import LogQuerySchema
from schemas.runs import RunStore
from trainer_api.services import run_or_404, services

blp = Blueprint("logs", __name__, url_prefix="/runs", description="Run logs")

# A comment line every so often: a WSGI app sees a client's disconnect only when a write fails.
KEEPALIVE_S = 15.0
POLL_S = 0.5
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
@blp.arguments(LogQuerySchema, location="query", unknown=RAISE)
@blp.doc(responses=TEXT_RESPONSE)
def run_log(query: dict[str, int], run_id: str) -> Response:
    """The last `tail` lines the worker logged for the run (empty before it starts)."""
    lines, _ = read_lines(log_path(run_id))
    text = "".join(f"{line}\n" for line in lines[-query["tail"] :])
    return Response(text, mimetype="text/plain")


@blp.route("/<string:run_id>/logs/stream")
@blp.arguments(LogQuerySchema, location="query", unknown=RAISE)
@blp.doc(responses=STREAM_RESPONSE)
def stream_run_log(query: dict[str, int], run_id: str) -> Response:
    """The last `tail` lines, then each new one as it is written, until the run has finished."""
    path = log_path(run_id)
    store = services().store
    poll_s = float(current_app.config.get("TRAINER_LOG_POLL_S", POLL_S))
    follow = follow_log(
        path, query["tail"], lambda: run_finished(store, run_id), poll_s, time.monotonic, time.sleep
    )
    response = Response(stream_with_context(follow), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # proxies must pass events on as they come
    return response


def log_path(run_id: str) -> Path:
    found = services()
    run_or_404(run_id)
    return found.settings.run_log(run_id)


def run_finished(store: RunStore, run_id: str) -> bool:
    record = store.get(run_id)
    return record is None or record.is_terminal


def read_lines(path: Path, offset: int = 0) -> tuple[list[str], int]:
    """Formatted whole lines from byte `offset` (the writer may be mid-line), and where the next starts."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    lines = [format_record(raw) for raw in complete.decode("utf-8", errors="replace").splitlines()]
    return lines, offset + len(complete)


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


def follow_log(
    path: Path,
    tail: int,
    finished: Callable[[], bool],
    poll_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Iterator[str]:
    """Server-sent events: the last `tail` lines, then new ones, then `end` once the run has finished."""
    lines, offset = read_lines(path)
    yield from (f"data: {line}\n\n" for line in lines[-tail:])
    last_write = clock()
    while True:
        # Read after checking: lines written just before the run finished still go out.
        done = finished()
        lines, offset = read_lines(path, offset)
        for line in lines:
            yield f"data: {line}\n\n"
        if lines:
            last_write = clock()
        if done:
            yield "event: end\ndata: \n\n"
            return
        if clock() - last_write >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_write = clock()
        sleep(poll_s)
