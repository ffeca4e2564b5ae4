"""One run through every real part: the API under gunicorn, Redis, a Celery worker, Lightning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
import requests

from schemas.events import (
    EVENTS_STREAM,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    decode_event,
)
from tests.conftest import Stack

SNOWFLAKE = 123456789012345678


def submit(stack: Stack, **overrides: object) -> str:
    body: dict[str, object] = {
        "model_size": "tiny",
        "max_seq_len": 32,
        "batch_size": 8,
        "num_epochs": 2,
        "corpus_path": str(stack.corpus_root / "stories.txt"),
        "user_id": SNOWFLAKE,
        **overrides,
    }
    response = requests.post(f"{stack.api_url}/runs/train", json=body, timeout=10)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def events_until_terminal(
    subscriber: redis.client.PubSub, run_id: str, timeout_s: float = 180
) -> list[TrainEvent]:
    events: list[TrainEvent] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = subscriber.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is None:
            continue
        event = decode_event(message["data"])
        assert not isinstance(event, NotAnEvent), event.reason
        if event.run_id == run_id:
            events.append(event)
            if isinstance(event, (TrainCompleted, TrainFailed)):
                return events
    raise AssertionError(f"run {run_id} did not finish; events so far: {events}")


def test_a_run_streams_started_progress_completed_and_ends_completed(
    stack: Stack, subscriber: redis.client.PubSub
) -> None:
    run_id = submit(stack)
    events = events_until_terminal(subscriber, run_id)

    assert isinstance(events[0], TrainStarted)
    assert isinstance(events[-1], TrainCompleted)
    progress = [event for event in events if isinstance(event, TrainProgress)]
    assert progress, "at least one progress event"
    assert len([event for event in events if isinstance(event, TrainStarted)]) == 1
    for event in events:
        assert event.request_id == event.run_id == run_id
        assert event.user_id == SNOWFLAKE
        assert event.event_id
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert progress[-1].epoch == progress[-1].total_epochs == 2
    completed = events[-1]
    assert isinstance(completed, TrainCompleted)
    assert completed.perplexity == pytest.approx(2.718281828**completed.loss, rel=1e-6)
    assert completed.loss < progress[0].loss, "training lowered the loss"
    assert Path(completed.artifact_path).is_relative_to(stack.artifacts_root.resolve())
    assert (Path(completed.artifact_path) / "config.json").is_file()

    # The durable stream holds the same events, in the same order.
    client = redis.Redis.from_url(stack.redis_url)
    entries = client.xrange(EVENTS_STREAM)
    assert entries is not None
    streamed = [decode_event(fields[b"event"]) for _, fields in entries if fields]
    assert [
        event for event in streamed if not isinstance(event, NotAnEvent) and event.run_id == run_id
    ] == events

    status = requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()
    assert status["status"] == "completed"
    assert status["user_id"] == SNOWFLAKE
    assert isinstance(status["last_heartbeat_ts"], float)
    assert status["loss"] == pytest.approx(completed.loss)
    assert status["artifact_path"] == completed.artifact_path
    manifest = json.loads((Path(completed.artifact_path) / "manifest.json").read_text())
    assert manifest["run_id"] == run_id

    # The run's log, as text and as a finished stream, shows its events.
    run_log = requests.get(f"{stack.api_url}/runs/{run_id}/logs?tail=1000", timeout=10).text
    assert f'"run_id":"{run_id}"' in run_log
    assert "trainer.train.completed.v1" in run_log
    stream_text = requests.get(f"{stack.api_url}/runs/{run_id}/logs/stream?tail=1000", timeout=30).text
    assert stream_text.endswith("event: end\ndata: \n\n")
    assert stream_text.count("data: ") - 1 == len(run_log.splitlines())

    # Lightning writes nothing into the worker's working directory and no progress bar into its log.
    assert list(stack.worker_cwd.iterdir()) == []
    log = stack.worker.log()
    assert f"Task trainer.train[{status['job_id']}] succeeded" in log
    assert "it/s]" not in log
    assert "lightning_logs" not in log
    assert "Trainable params" not in log


def test_a_corpus_too_small_fails_as_a_user_error_and_the_worker_takes_the_next_run(
    stack: Stack, subscriber: redis.client.PubSub
) -> None:
    doomed = submit(stack, corpus_path="tiny.txt", num_epochs=1)
    following = submit(stack, num_epochs=1)

    failed = events_until_terminal(subscriber, doomed)[-1]
    assert isinstance(failed, TrainFailed)
    assert failed.error_kind == "user"
    assert failed.status == "failed"
    assert "too small" in failed.message
    assert "batch_size" in failed.message
    status = requests.get(f"{stack.api_url}/runs/{doomed}", timeout=10).json()
    assert status["status"] == "failed"
    assert status["message"] == failed.message

    assert isinstance(events_until_terminal(subscriber, following)[-1], TrainCompleted)
    assert requests.get(f"{stack.api_url}/runs/{following}", timeout=10).json()["status"] == "completed"
