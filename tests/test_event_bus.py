"""trainer_tasks.events.EventBus against the real Redis: pub/sub, the bounded stream and the run hash."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from schemas.events import (
    EVENTS_CHANNEL,
    EVENTS_STREAM,
    TrainFailed,
    TrainProgress,
    decode_event,
    encode_event,
)
from scripts.devstack import free_port
from tests.streams import stream_fields
from trainer_store.metrics import METRICS_KEY
from trainer_store.runs import run_key
from trainer_tasks.events import EventBus

SNOWFLAKE = 123456789012345678


def progress(run_id: str = "run-1", seq: int | None = 1, step: int = 10) -> TrainProgress:
    return TrainProgress(
        request_id=run_id,
        run_id=run_id,
        user_id=SNOWFLAKE,
        event_id=f"e-{step}",
        seq=seq,
        ts=1700000000.5,
        epoch=1,
        total_epochs=2,
        step=step,
        loss=2.5,
    )


@pytest.fixture
def bus(redis_client: redis.Redis) -> EventBus:
    return EventBus(redis_client, stream_maxlen=1000)


@pytest.fixture
def subscriber(redis_client: redis.Redis) -> Iterator[redis.client.PubSub]:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(EVENTS_CHANNEL)
    confirmation = pubsub.get_message(timeout=5.0)
    assert confirmation is not None
    assert confirmation["type"] == "subscribe"
    yield pubsub
    pubsub.close()


def next_message(pubsub: redis.client.PubSub, timeout_s: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            data = message["data"]
            assert isinstance(data, bytes)
            return data
    raise AssertionError("no message on the events channel")


def stream_payloads(client: redis.Redis) -> list[bytes]:
    return [fields[b"event"] for fields in stream_fields(client, EVENTS_STREAM)]


def test_send_publishes_the_encoded_event(
    bus: EventBus, subscriber: redis.client.PubSub, redis_client: redis.Redis
) -> None:
    event = progress()
    assert bus.send(event) is True
    data = next_message(subscriber)
    assert data.decode() == encode_event(event)
    assert decode_event(data) == event


def test_send_appends_to_the_stream_with_field_event(bus: EventBus, redis_client: redis.Redis) -> None:
    first, second = progress(seq=1, step=1), progress(seq=2, step=2)
    assert bus.send(first)
    assert bus.send(second)
    assert [set(fields) for fields in stream_fields(redis_client, EVENTS_STREAM)] == [{b"event"}, {b"event"}]
    assert [decode_event(payload) for payload in stream_payloads(redis_client)] == [first, second]
    assert redis_client.hget(METRICS_KEY, "events_published") == b"2", "counted for /metrics"


def existing_run(client: redis.Redis, run_id: str) -> None:
    client.hset(run_key(run_id), mapping={"run_id": run_id, "status": "running"})


def test_send_writes_last_event_and_last_seq_on_the_run_hash(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    existing_run(redis_client, "run-7")
    event = progress(run_id="run-7", seq=42)
    assert bus.send(event)
    stored = redis_client.hgetall(run_key("run-7"))
    assert stored[b"last_event"] == encode_event(event).encode()
    assert stored[b"last_seq"] == b"42"
    # The rest of the record is left as it was.
    assert stored[b"status"] == b"running"
    assert not redis_client.exists(run_key("run-1"))


def test_an_event_without_seq_records_last_seq_zero(bus: EventBus, redis_client: redis.Redis) -> None:
    existing_run(redis_client, "run-2")
    failed = TrainFailed(
        request_id="run-2", run_id="run-2", user_id=0, error_kind="system", message="x", status="failed"
    )
    assert bus.send(failed)
    assert redis_client.hget(run_key("run-2"), "last_seq") == b"0"
    assert decode_event(stream_payloads(redis_client)[0]) == failed


def test_an_event_for_a_deleted_run_is_delivered_but_does_not_recreate_the_record(
    bus: EventBus, subscriber: redis.client.PubSub, redis_client: redis.Redis
) -> None:
    event = progress(run_id="run-gone", seq=3)
    assert bus.send(event) is True
    assert decode_event(next_message(subscriber)) == event
    assert [decode_event(payload) for payload in stream_payloads(redis_client)] == [event]
    assert not redis_client.exists(run_key("run-gone"))


def test_each_sent_event_is_logged_at_info(
    bus: EventBus, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    event = progress(run_id="run-3", seq=5)
    with caplog.at_level(logging.INFO, logger="trainer_tasks.events"):
        assert bus.send(event)
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.INFO, f"event {encode_event(event)}")
    ]


def test_the_stream_is_trimmed_near_maxlen(redis_client: redis.Redis) -> None:
    maxlen, sends = 50, 800
    bus = EventBus(redis_client, stream_maxlen=maxlen)
    for step in range(1, sends + 1):
        assert bus.send(progress(seq=step, step=step))
    length = redis_client.xlen(EVENTS_STREAM)
    # Approximate trimming removes whole macro nodes (stream-node-max-entries, 100 by default).
    node_entries = int(str(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"]))
    assert maxlen <= length <= maxlen + node_entries
    assert length < sends
    assert decode_event(stream_payloads(redis_client)[-1]) == progress(seq=sends, step=sends)


def test_unreachable_redis_answers_false_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="trainer_tasks.events"):
            assert EventBus(client, stream_maxlen=10).send(progress(run_id="run-9")) is False
    finally:
        client.close()
    assert any(
        "trainer.train.progress.v1" in record.getMessage() and "run-9" in record.getMessage()
        for record in caplog.records
    )


def test_an_event_with_no_json_form_is_not_sent_and_training_goes_on(
    bus: EventBus, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.events"):
        assert bus.send(progress_with_loss(float("nan"))) is False
    assert stream_payloads(redis_client) == []
    assert any("not encodable" in record.message for record in caplog.records)
    assert redis_client.hget(METRICS_KEY, "events_published") is None


def test_a_final_event_with_no_json_form_is_not_tried_again(
    bus: EventBus,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", refuse_to_wait)
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.events"):
        assert bus.deliver(progress_with_loss(float("inf")), patience_s=60) is False
    # No amount of waiting gives it a JSON form: it is given up at once.
    assert stream_payloads(redis_client) == []
    assert any("not encodable" in record.message for record in caplog.records)


def test_a_final_event_redis_refuses_is_not_tried_again(
    bus: EventBus,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_client.set(EVENTS_STREAM, "not a stream")  # XADD answers WRONGTYPE, as often as it is asked
    monkeypatch.setattr(time, "sleep", refuse_to_wait)
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.events"):
        assert bus.deliver(progress(run_id="run-9"), patience_s=60) is False
    assert any(
        "run-9 refused by Redis" in record.getMessage() and "WRONGTYPE" in record.getMessage()
        for record in caplog.records
    )


def refuse_to_wait(seconds: float) -> None:
    raise AssertionError(f"waited {seconds} s for an answer that cannot change")


def progress_with_loss(loss: float) -> TrainProgress:
    return TrainProgress(
        request_id="run-1", run_id="run-1", user_id=7, epoch=1, total_epochs=1, step=1, loss=loss
    )
