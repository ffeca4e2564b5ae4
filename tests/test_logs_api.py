"""GET /runs/{run_id}/logs and /logs/stream: a run's log as text and as server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import redis
from flask import Flask
from flask.testing import FlaskClient

from schemas.runs import RunStore
from schemas.settings import Settings
from trainer_api.logs import KEEPALIVE_S, follow_log, format_record

TS = 1794830400.0  # 2026-11-16T12:00:00Z


def record(message: str, ts: float = TS, level: str = "INFO") -> str:
    return json.dumps({"ts": ts, "level": level, "logger": "trainer_tasks.events", "message": message}) + "\n"


def new_run(redis_client: redis.Redis, run_id: str = "run-1") -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=run_id, job_id="job", user_id=7, request={}, now=TS)
    return store


def write_log(settings: Settings, run_id: str, text: str) -> Path:
    path = settings.run_log(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(text)
    return path


def test_the_log_is_text_with_the_last_lines(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    new_run(redis_client)
    write_log(settings, "run-1", "".join(record(f"line {n}", TS + n) for n in range(5)))
    response = client.get("/runs/run-1/logs?tail=2")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == (
        "2026-11-16T12:00:03Z INFO trainer_tasks.events: line 3\n"
        "2026-11-16T12:00:04Z INFO trainer_tasks.events: line 4\n"
    )
    assert len(client.get("/runs/run-1/logs").get_data(as_text=True).splitlines()) == 5


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


def test_a_half_written_last_line_waits_for_its_end(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    new_run(redis_client)
    write_log(settings, "run-1", record("whole") + '{"ts": 1, "lev')
    assert client.get("/runs/run-1/logs").get_data(as_text=True).endswith("whole\n")


def test_lines_that_are_not_log_records_are_shown_as_they_are() -> None:
    assert format_record("plain text") == "plain text"
    assert format_record('["a list"]') == '["a list"]'
    assert format_record('{"message": "no time"}') == '{"message": "no time"}'
    assert (
        format_record(record("m", level="WARNING").strip())
        == "2026-11-16T12:00:00Z WARNING trainer_tasks.events: m"
    )


def test_the_stream_of_a_finished_run_sends_its_lines_then_ends(
    app: Flask, settings: Settings, redis_client: redis.Redis
) -> None:
    store = new_run(redis_client)
    assert store.claim("run-1", "w", 60, TS)
    assert store.finish("run-1", "completed", "completed", TS)
    write_log(settings, "run-1", record("first") + record("second"))
    response = app.test_client().get("/runs/run-1/logs/stream?tail=1")
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.get_data(as_text=True) == (
        "data: 2026-11-16T12:00:00Z INFO trainer_tasks.events: second\n\nevent: end\ndata: \n\n"
    )


class FakeTime:
    """A clock that moves only when the follower sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_following_sends_new_lines_keepalives_and_the_end(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(record("old"))
    time = FakeTime()
    state = {"finished": False}
    events: Iterator[str] = follow_log(path, 10, lambda: state["finished"], 5.0, time.clock, time.sleep)

    assert next(events).endswith("old\n\n")
    with path.open("a") as handle:
        handle.write(record("new"))
    assert next(events).endswith("new\n\n")
    # Quiet for KEEPALIVE_S: a comment keeps the connection honest.
    assert next(events) == ": keepalive\n\n"
    assert time.now >= KEEPALIVE_S
    with path.open("a") as handle:
        handle.write(record("last words"))
    state["finished"] = True
    assert next(events).endswith("last words\n\n")
    assert next(events) == "event: end\ndata: \n\n"
    assert list(events) == []
    assert set(time.sleeps) == {5.0}


def test_following_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "later.jsonl"
    time = FakeTime()
    calls = {"n": 0}

    def finished() -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_text(record("appeared"))
        return calls["n"] >= 3

    assert list(follow_log(path, 10, finished, 1.0, time.clock, time.sleep)) == [
        "data: 2026-11-16T12:00:00Z INFO trainer_tasks.events: appeared\n\n",
        "event: end\ndata: \n\n",
    ]
