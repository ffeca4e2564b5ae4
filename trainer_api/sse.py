"""Server-sent events from a Redis stream: what is there, then each new entry, until the run has finished.

The logs and the events of a run are followed the same way; any API replica serves either, because the
entries live in Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Response, stream_with_context

from trainer_api.services import services
from trainer_store.streams import StreamEntry

# Each blocking read waits this long in Redis for new entries (well within the client's socket timeout),
# then the run's status is looked at again.
BLOCK_S = 2.0
# After the run's record says it has ended, entries written within this long still go out.
SETTLE_S = 1.0
END = "event: end\ndata: \n\n"
KEEPALIVE = ": keepalive\n\n"
# Sent first: the server sends the response's headers with its first bytes, and a follower of a quiet
# stream would otherwise not know it is connected (an EventSource would not open) until the keepalive.
OPENING = ": open\n\n"


# Entries after an id; waits up to the given seconds in Redis for the first (None: answers at once).
ReadAfter = Callable[[str, float | None], list[StreamEntry]]


@dataclass(frozen=True)
class Follow:
    """How one stream is followed: where it starts, how it is read, and when it is over."""

    read_after: ReadAfter
    # True once the run's record is terminal: what is left is sent, then the stream ends.
    finished: Callable[[], bool]
    after_id: str
    first: tuple[StreamEntry, ...] = ()
    # True for the entry that is the last one the stream sends.
    last: Callable[[StreamEntry], bool] = lambda _entry: False
    send_ids: bool = False
    # Once the run has finished, how long to wait for entries still on their way (None: not at all): the
    # worker records a run's end before it sends the last event and logs it.
    settle_s: float | None = None


def message(entry: StreamEntry, send_id: bool) -> str:
    """One event: its id when asked for, and a `data:` line for each line of its data."""
    head = f"id: {entry.entry_id}\n" if send_id else ""
    return head + "".join(f"data: {line}\n" for line in entry.data.split("\n")) + "\n"


def follow(spec: Follow, block_s: float, keepalive_s: float, clock: Callable[[], float]) -> Iterator[str]:
    """An opening comment, the first entries, then new ones as Redis hands them over (a blocking read, no
    polling), a keepalive comment while quiet, and `event: end` after the last entry or once the run has
    finished and every entry written before that has gone out."""
    yield OPENING
    last_id = spec.after_id
    for entry in spec.first:
        yield message(entry, spec.send_ids)
        last_id = entry.entry_id
    last_write = clock()
    while True:
        # Read after checking: entries written just before the run finished still go out.
        done = spec.finished()
        wait_s = min(block_s, max(0.001, keepalive_s - (clock() - last_write)))
        entries = spec.read_after(last_id, spec.settle_s if done else wait_s)
        for entry in entries:
            yield message(entry, spec.send_ids)
            last_id = entry.entry_id
            if spec.last(entry):
                yield END
                return
        if entries:
            last_write = clock()
            continue  # a full batch may have more behind it
        if done:
            yield END
            return
        if clock() - last_write >= keepalive_s:
            yield KEEPALIVE
            last_write = clock()


def event_stream(events: Iterator[str]) -> Response:
    response = Response(stream_with_context(events), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # proxies must pass events on as they come
    return response


def follow_response(spec: Follow, clock: Callable[[], float]) -> Response:
    """The followed stream as a `text/event-stream` response.

    A WSGI app sees a client's disconnect only when a write fails: the keepalive comment is that write,
    and then the generator is closed and holds nothing more (each read is one Redis command of the pool).
    """
    keepalive_s = services().settings.stream_keepalive_s
    return event_stream(follow(spec, min(BLOCK_S, keepalive_s), keepalive_s, clock))
