"""GET /runs/{run_id}/logs and /logs/stream: a run's log lines from Redis, as text and as server-sent
events."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import redis
from flask import Flask
from flask.testing import FlaskClient

from tests.test_api import app_with
from trainer_api.logs import follow_log, format_record
from trainer_store.runs import RunStore, run_log_key
from trainer_store.settings import Settings

TS = 1794830400.0  # 2026-11-16T12:00:00Z


def record(message: str, ts: float = TS, level: str = "INFO") -> str:
    return json.dumps({"ts": ts, "level": level, "logger": "trainer_tasks.events", "message": message})


def new_run(redis_client: redis.Redis, run_id: str = "run-1") -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=run_id, job_id="job", user_id=7, request={}, now=TS)
    return store


def log(redis_client: redis.Redis, run_id: str, *lines: str) -> None:
    """Lines as the worker's writer adds them to the run's stream."""
    for line in lines:
        redis_client.xadd(run_log_key(run_id), {"line": line})


def test_the_log_is_text_with_the_last_lines(client: FlaskClient, redis_client: redis.Redis) -> None:
    new_run(redis_client)
    log(redis_client, "run-1", *(record(f"line {n}", TS + n) for n in range(5)))
    response = client.get("/runs/run-1/logs?tail=2")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == (
        "2026-11-16T12:00:03Z INFO trainer_tasks.events: line 3\n"
        "2026-11-16T12:00:04Z INFO trainer_tasks.events: line 4\n"
    )
    assert len(client.get("/runs/run-1/logs").get_data(as_text=True).splitlines()) == 5


def test_any_api_instance_serves_any_runs_log(
    app: Flask, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Two API apps share nothing but Redis: the lines one run wrote are read through either."""
    other, _ = app_with(
        replace(settings, artifacts_root=str(tmp_path / "elsewhere"), runs_root=str(tmp_path / "elsewhere"))
    )
    new_run(redis_client)
    log(redis_client, "run-1", record("from the worker"))
    for instance in (app, other):
        assert instance.test_client().get("/runs/run-1/logs").get_data(as_text=True).endswith("the worker\n")


def test_a_run_that_has_not_started_has_an_empty_log(client: FlaskClient, redis_client: redis.Redis) -> None:
    new_run(redis_client)
    response = client.get("/runs/run-1/logs")
    assert response.status_code == 200
    assert response.get_data() == b""


def test_an_unknown_run_and_a_bad_tail_are_errors(client: FlaskClient, redis_client: redis.Redis) -> None:
    new_run(redis_client)
    missing = client.get("/runs/ghost/logs")
    assert missing.status_code == 404
    assert missing.json is not None
    assert missing.json["code"] == "NOT_FOUND"
    assert client.get("/runs/ghost/logs/stream").status_code == 404
    unknown = client.get("/runs/run-1/logs?lines=5")
    assert unknown.status_code == 422
    assert unknown.json is not None
    assert set(unknown.json["errors"]) == {"lines"}
    bad = client.get("/runs/run-1/logs?tail=0")
    assert bad.status_code == 422
    assert bad.json is not None
    assert set(bad.json["errors"]) == {"tail"}


def test_lines_that_are_not_log_records_are_shown_as_they_are() -> None:
    assert format_record("plain text") == "plain text"
    assert format_record('["a list"]') == '["a list"]'
    assert format_record('{"message": "no time"}') == '{"message": "no time"}'
    assert (
        format_record(record("m", level="WARNING")) == "2026-11-16T12:00:00Z WARNING trainer_tasks.events: m"
    )


def test_the_stream_of_a_finished_run_sends_its_lines_then_ends(
    app: Flask, redis_client: redis.Redis
) -> None:
    store = new_run(redis_client)
    assert store.claim("run-1", "w", 60, TS)
    assert store.finish("run-1", "completed", "completed", TS)
    log(redis_client, "run-1", record("first"), record("second"))
    response = app.test_client().get("/runs/run-1/logs/stream?tail=1")
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.get_data(as_text=True) == (
        ": open\n\ndata: 2026-11-16T12:00:00Z INFO trainer_tasks.events: second\n\nevent: end\ndata: \n\n"
    )


class Clock:
    """Real time for the blocking reads, read through a function the test can look at."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.monotonic()


def test_following_wakes_for_each_new_line_sends_keepalives_and_ends(redis_client: redis.Redis) -> None:
    log(redis_client, "run-1", record("old"))
    state = {"finished": False}
    events: Iterator[str] = follow_log(
        redis_client, "run-1", 10, lambda: state["finished"], block_s=5.0, keepalive_s=0.3, clock=Clock()
    )
    # A comment first: the response's headers go out with it, before anything else is there to send.
    assert next(events) == ": open\n\n"
    assert next(events).endswith("old\n\n")
    # A line written while the follower waits in Redis goes out at once, not at the end of the wait.
    writer = threading.Timer(0.1, lambda: log(redis_client, "run-1", record("new")))
    writer.start()
    began = time.monotonic()
    assert next(events).endswith("new\n\n")
    assert time.monotonic() - began < 2.0
    # Quiet for the keepalive interval: a comment keeps the connection honest.
    assert next(events) == ": keepalive\n\n"
    log(redis_client, "run-1", record("last words"))
    state["finished"] = True
    assert next(events).endswith("last words\n\n")
    assert next(events) == "event: end\ndata: \n\n"
    assert list(events) == []


def test_following_a_log_that_does_not_exist_yet(redis_client: redis.Redis) -> None:
    calls = {"n": 0}

    def finished() -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            log(redis_client, "run-1", record("appeared"))
        return calls["n"] >= 3

    assert list(follow_log(redis_client, "run-1", 10, finished, 0.05, 15.0, time.monotonic)) == [
        ": open\n\n",
        "data: 2026-11-16T12:00:00Z INFO trainer_tasks.events: appeared\n\n",
        "event: end\ndata: \n\n",
    ]
