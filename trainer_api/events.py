"""A run's v1 events as server-sent events: its whole history from the run's own stream, then each new one."""

from __future__ import annotations

import json
import re
import time

from flask import Response, request
from flask_smorest import Blueprint, abort

from schemas.api import ErrorSchema
from schemas.events import EVENT_FIELD, TrainCompleted, TrainFailed
from trainer_api.logs import run_finished
from trainer_api.services import run_or_404, services
from trainer_api.sse import SETTLE_S, Follow, follow_response
from trainer_store import streams
from trainer_store.runs import run_events_key
from trainer_store.streams import StreamEntry

blp = Blueprint("events", __name__, url_prefix="/runs", description="Run events")

LAST_EVENT_ID = "Last-Event-ID"
# A Redis stream entry id, as sent in `id:`.
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# After either of these the run's training is over: the stream ends.
FINAL_TYPES = frozenset({TrainCompleted.type, TrainFailed.type})
STREAM_RESPONSE = {
    "200": {
        "description": "One event a message: `id:` its entry id, `data:` the event's v1 JSON as published "
        "on Redis; the run's whole history first, then live, then `event: end` after the terminal event "
        "(or once the run's record is terminal). `: keepalive` comments while quiet.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
LAST_EVENT_ID_PARAMETER = {
    "name": LAST_EVENT_ID,
    "in": "header",
    "required": False,
    "description": "Resume after this entry id (an EventSource sends it when it reconnects).",
    "schema": {"type": "string", "pattern": _ENTRY_ID.pattern},
}


@blp.route("/<string:run_id>/events")
@blp.doc(responses=STREAM_RESPONSE, parameters=[LAST_EVENT_ID_PARAMETER])
@blp.alt_response(400, schema=ErrorSchema, description="`Last-Event-ID` is not an entry id.")
@blp.alt_response(403, schema=ErrorSchema, description="A signed link that is tampered or expired.")
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
def stream_run_events(run_id: str) -> Response:
    """The run's events from its first (or after `Last-Event-ID`), then each new one, until it has ended."""
    after_id = resume_after()
    run_or_404(run_id)
    found = services()
    key = run_events_key(run_id)
    spec = Follow(
        read_after=lambda after, block_s: streams.read_after(found.redis, key, EVENT_FIELD, after, block_s),
        finished=lambda: run_finished(found.store, run_id),
        after_id=after_id,
        last=is_final,
        send_ids=True,
        settle_s=SETTLE_S,
    )
    return follow_response(spec, time.monotonic)


def resume_after() -> str:
    offered = request.headers.get(LAST_EVENT_ID, "").strip()
    if not offered:
        return streams.START_ID
    if not _ENTRY_ID.fullmatch(offered):
        abort(400, message=f"{LAST_EVENT_ID} must be an id this stream sent, such as 1700000000000-0")
    return offered


def is_final(entry: StreamEntry) -> bool:
    try:
        event: object = json.loads(entry.data)
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("type") in FINAL_TYPES
