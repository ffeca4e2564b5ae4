"""GET /runs/{run_id}/events: a run's v1 events as server-sent events, from its own stream in Redis."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import redis
import requests
from flask import Flask
from flask.testing import FlaskClient

from schemas.events import (
    EVENT_FIELD,
    EVENTS_STREAM,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    encode_event,
)
from tests.conftest import Stack
from tests.test_api import app_with, assert_envelope
from tests.test_end_to_end import submit
from trainer_api.events import is_final
from trainer_api.services import EXTENSION
from trainer_api.sse import Follow, follow, message
from trainer_client.client import ServerSentEvent, TrainerClient, server_sent_events
from trainer_store import streams
from trainer_store.runs import FINISHED_RUN_TTL_S, RUN_EVENTS_MAXLEN, RunStore, run_events_key
from trainer_store.settings import Settings
from trainer_store.streams import START_ID, StreamEntry
from trainer_tasks.events import EventBus

TS = 1794830400.0
KEY = {"X-Api-Key": "k3y"}


def started(run_id: str, seq: int = 1) -> TrainStarted:
    return TrainStarted(
        request_id=run_id,
        run_id=run_id,
        user_id=7,
        seq=seq,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=1,
        queue="training",
    )


def progress(run_id: str, seq: int) -> TrainProgress:
    return TrainProgress(
        request_id=run_id, run_id=run_id, user_id=7, seq=seq, epoch=0, total_epochs=1, step=seq, loss=2.5
    )


def completed(run_id: str, seq: int) -> TrainCompleted:
    return TrainCompleted(
        request_id=run_id, run_id=run_id, user_id=7, seq=seq, loss=2.0, perplexity=7.4, artifact_path="m/"
    )


def new_run(redis_client: redis.Redis, run_id: str = "run-1") -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=run_id, job_id="job", user_id=7, request={}, now=TS)
    return store


def parsed(body: str) -> list[ServerSentEvent]:
    return list(server_sent_events(iter(body.split("\n"))))


def test_the_bus_appends_each_event_to_the_runs_own_stream_only_while_the_run_exists(
    redis_client: redis.Redis,
) -> None:
    new_run(redis_client)
    bus = EventBus(redis_client, stream_maxlen=1000)
    sent: list[TrainEvent] = [started("run-1"), progress("run-1", 2), started("gone")]
    assert all(bus.send(event) for event in sent)
    history = streams.entries(redis_client.xrange(run_events_key("run-1")), EVENT_FIELD)
    assert [entry.data for entry in history] == [encode_event(e) for e in sent[:2]]
    assert 0 < redis_client.ttl(run_events_key("run-1")) <= FINISHED_RUN_TTL_S
    # The global stream has every event; a run without a record gets no stream of its own.
    assert redis_client.xlen(EVENTS_STREAM) == 3
    assert not redis_client.exists(run_events_key("gone"))
    assert RUN_EVENTS_MAXLEN == 50_000


def test_a_finished_runs_history_is_sent_with_ids_then_the_stream_ends(
    client: FlaskClient, redis_client: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    store = new_run(redis_client)
    bus = EventBus(redis_client, stream_maxlen=1000)
    sent: list[TrainEvent] = [started("run-1"), progress("run-1", 2), completed("run-1", 3)]
    for event in sent:
        assert bus.send(event)
    assert store.claim("run-1", "w", 60, TS)
    assert store.finish("run-1", "completed", "completed", TS)
    ids = [
        entry.entry_id for entry in streams.entries(redis_client.xrange(run_events_key("run-1")), EVENT_FIELD)
    ]

    response = client.get("/runs/run-1/events")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    events = parsed(response.get_data(as_text=True))
    assert events == [
        *(
            ServerSentEvent(encode_event(event), "message", entry_id)
            for event, entry_id in zip(sent, ids, strict=True)
        ),
        ServerSentEvent("", "end", ids[-1]),
    ]

    # Another API replica, sharing nothing but Redis, sends the same.
    other, _ = app_with(
        replace(settings, artifacts_root=str(tmp_path / "else"), runs_root=str(tmp_path / "else"))
    )
    assert other.test_client().get("/runs/run-1/events").get_data() == response.get_data()

    # Resumed after the first: the rest only.
    resumed = client.get("/runs/run-1/events", headers={"Last-Event-ID": ids[0]})
    assert [event.id for event in parsed(resumed.get_data(as_text=True))][:2] == ids[1:]
    after_all = client.get("/runs/run-1/events", headers={"Last-Event-ID": ids[-1]})
    assert after_all.get_data(as_text=True) == ": open\n\nevent: end\ndata: \n\n"


def test_a_terminal_event_ends_the_stream_while_the_record_still_says_running(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    store = new_run(redis_client)
    assert store.claim("run-1", "w", 60, TS)
    bus = EventBus(redis_client, stream_maxlen=1000)
    failed = TrainFailed(
        request_id="run-1", run_id="run-1", user_id=7, seq=2, error_kind="user", message="x", status="failed"
    )
    for event in (started("run-1"), failed, progress("run-1", 3)):
        assert bus.send(event)
    body = client.get("/runs/run-1/events").get_data(as_text=True)
    assert [event.event for event in parsed(body)] == ["message", "message", "end"]
    assert encode_event(failed) in body


def test_errors_of_the_events_route(client: FlaskClient, redis_client: redis.Redis) -> None:
    new_run(redis_client)
    assert_envelope(client.get("/runs/ghost/events"), 404, "NOT_FOUND")
    assert_envelope(
        client.get("/runs/run-1/events", headers={"Last-Event-ID": "not-an-id"}), 400, "BAD_REQUEST"
    )
    spec = client.get("/openapi.json").get_json()["paths"]["/runs/{run_id}/events"]["get"]
    assert {"200", "400", "403", "404"} <= set(spec["responses"])
    assert "text/event-stream" in spec["responses"]["200"]["content"]


def test_a_signed_events_link_needs_no_key(settings: Settings, redis_client: redis.Redis) -> None:
    app, _ = app_with(replace(settings, api_key="k3y", link_secret="s3cret"))
    secured = app.test_client()
    store = new_run(redis_client)
    assert EventBus(redis_client, stream_maxlen=1000).send(started("run-1"))
    assert store.claim("run-1", "w", 60, TS)
    assert store.finish("run-1", "completed", "completed", TS)
    links = secured.post("/runs/run-1/links", json={}, headers=KEY).get_json()
    assert links["events"].startswith(f"/runs/run-1/events?expires={links['expires_at']}&signature=")
    assert_envelope(secured.get("/runs/run-1/events"), 401, "UNAUTHORIZED")
    answer = secured.get(links["events"])
    assert answer.status_code == 200
    assert [event.event for event in parsed(answer.get_data(as_text=True))] == ["message", "end"]
    # The events link opens the events only, and a changed one opens nothing.
    other = links["events"].replace("/events?", "/model.zip?")
    assert_envelope(secured.get(other), 403, "FORBIDDEN")
    assert_envelope(secured.get(links["events"][:-2] + "00"), 403, "FORBIDDEN")


def test_following_sends_each_line_of_data_drains_a_full_batch_and_stops_at_the_last() -> None:
    batches = [
        [StreamEntry("1-0", "a\nb"), StreamEntry("2-0", "c")],
        [StreamEntry("3-0", "stop"), StreamEntry("4-0", "never")],
    ]
    asked: list[tuple[str, float | None]] = []

    def read_after(after_id: str, block_s: float | None) -> list[StreamEntry]:
        asked.append((after_id, block_s))
        return batches.pop(0)

    spec = Follow(
        read_after=read_after,
        finished=lambda: False,
        after_id=START_ID,
        last=lambda entry: entry.data == "stop",
        send_ids=True,
    )
    assert list(follow(spec, 1.0, 15.0, time.monotonic)) == [
        ": open\n\n",
        "id: 1-0\ndata: a\ndata: b\n\n",
        "id: 2-0\ndata: c\n\n",
        "id: 3-0\ndata: stop\n\n",
        "event: end\ndata: \n\n",
    ]
    assert [after for after, _ in asked] == [START_ID, "2-0"]
    assert message(StreamEntry("5-0", "x"), send_id=False) == "data: x\n\n"


def follow_stream(url: str, headers: dict[str, str] | None = None) -> Iterator[ServerSentEvent]:
    with requests.get(url, headers=headers, stream=True, timeout=(3, 60)) as response:
        assert response.status_code == 200, response.text
        yield from server_sent_events(response.iter_lines(decode_unicode=True))


def test_a_real_run_is_followed_from_its_history_to_its_end_and_can_be_resumed(stack: Stack) -> None:
    run_id = submit(stack, num_epochs=1)
    client = TrainerClient(stack.api_url)
    live: list[tuple[str, str]] = []
    # Joined after the run has begun: what was sent before comes first, then the rest as it happens.
    deadline = time.monotonic() + 120
    while client.run(run_id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    for run_event in client.events(run_id):
        live.append((run_event.entry_id, type(run_event.event).__name__))
    names = [name for _, name in live]
    assert names[0] == "TrainStarted"
    assert "TrainProgress" in names
    assert names[-1] == "TrainCompleted"
    assert client.run(run_id).status == "completed"

    # The whole history again, in order, with the same ids; and resumed from the middle, only the rest.
    again = [(event.entry_id, type(event.event).__name__) for event in client.events(run_id)]
    assert again == live
    middle = len(live) // 2
    resumed = [event.entry_id for event in client.events(run_id, after=live[middle][0])]
    assert resumed == [entry_id for entry_id, _ in live[middle + 1 :]]

    # A signed link works with no header at all (an EventSource's request).
    links = client.links(run_id, ttl_s=60)
    by_link = [event for event in follow_stream(stack.api_url + links.events) if event.event != "end"]
    assert [event.id for event in by_link] == [entry_id for entry_id, _ in live]
    client.close()


def test_a_follower_that_goes_away_frees_its_connection(stack: Stack) -> None:
    """A client that hangs up mid-stream: the server notices at its next keepalive (1 s on the stack) and
    stops reading Redis for it."""
    redis_client = redis.Redis.from_url(stack.redis_url)
    store = RunStore(redis_client)
    store.create(run_id="idle-run", job_id="job", user_id=0, request={}, now=time.time())

    def blocked_readers() -> int:
        # Connections blocked in XREAD now (flag b), not idle ones whose last command was one.
        listed = redis_client.client_list()
        return sum(1 for entry in listed if entry.get("cmd") == "xread" and "b" in entry.get("flags", ""))

    # The web line sends followers to the stream line, which this client then calls itself.
    moved = requests.get(f"{stack.api_url}/runs/idle-run/events", allow_redirects=False, timeout=10)
    assert moved.status_code == 307
    address = urlsplit(moved.headers["Location"])
    before = blocked_readers()
    with socket.create_connection((address.hostname or "", address.port or 80), timeout=10) as sock:
        sock.sendall(f"GET /runs/idle-run/events HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode())
        assert b"200 OK" in sock.recv(4096)
        deadline = time.monotonic() + 10
        while blocked_readers() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blocked_readers() == before + 1
    # Gone: within a keepalive interval and one blocking read the server has let go.
    deadline = time.monotonic() + 15
    while blocked_readers() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blocked_readers() == before
    record = store.get("idle-run")
    assert record is not None
    store.delete(record)
    redis_client.close()


def test_only_a_final_training_event_ends_the_stream() -> None:
    assert is_final(StreamEntry("1-0", encode_event(completed("run-1", 3))))
    assert not is_final(StreamEntry("1-0", encode_event(progress("run-1", 2))))
    assert not is_final(StreamEntry("1-0", "not json"))
    assert not is_final(StreamEntry("1-0", '["a list"]'))


def test_one_process_follows_more_streams_than_redis_pys_default_pool_allows(app: Flask) -> None:
    """Each follower holds a connection for its blocking read: 150 at once in one process all get theirs
    (redis-py's default pool refuses the 101st)."""
    client = app.extensions[EXTENSION].redis
    failures: list[BaseException] = []

    def follower(n: int) -> None:
        try:
            streams.read_after(client, run_events_key(f"quiet-{n}"), EVENT_FIELD, START_ID, 1.0)
        except redis.RedisError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=follower, args=(n,)) for n in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []


def test_the_last_event_sent_just_after_the_record_ended_still_goes_out(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    """The worker records a run's end, then sends its completed event: a follower that saw the record
    first still gets the event (a real pause between the two, as a busy worker may take)."""
    store = new_run(redis_client)
    bus = EventBus(redis_client, stream_maxlen=1000)
    assert bus.send(started("run-1"))
    assert store.claim("run-1", "w", 60, TS)
    assert store.finish("run-1", "completed", "completed", TS)
    late = threading.Timer(0.3, lambda: bus.send(completed("run-1", 2)))
    late.start()
    body = client.get("/runs/run-1/events").get_data(as_text=True)
    late.join()
    events = parsed(body)
    assert [event.event for event in events] == ["message", "message", "end"]
    assert events[1].data == encode_event(completed("run-1", 2))
