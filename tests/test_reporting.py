"""trainer_tasks.reporting.RunReporter on the real store and bus: stamps, record first, one terminal event."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from schemas.events import (
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
)
from schemas.status import RunStatus
from scripts.devstack import free_port
from tests.streams import sent_events
from trainer_store.outages import END_PATIENCE_S
from trainer_store.runs import RunRecord, RunStore, run_key
from trainer_tasks.errors import RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.reporting import RunReporter

RUN_ID = "run-1"
USER_ID = 123456789012345678
HOLDER = "worker-a"


class StepClock:
    """Answers 1000.0, 1001.0, ... one second further on each call."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start - 1.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class RecordAtSend(EventBus):
    """A real bus that also notes the run's record as it stood when each event was sent."""

    def __init__(self, client: redis.Redis, store: RunStore) -> None:
        super().__init__(client, stream_maxlen=1000)
        self._store = store
        self.records: list[RunRecord | None] = []

    def send(self, event: TrainEvent) -> bool:
        self.records.append(self._store.get(event.run_id))
        return super().send(event)

    def deliver(self, event: TrainEvent, patience_s: float = END_PATIENCE_S) -> bool:
        self.records.append(self._store.get(event.run_id))
        return super().deliver(event, patience_s)


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=RUN_ID, job_id="job-1", user_id=USER_ID, request={}, now=1.0)
    assert store.claim(RUN_ID, HOLDER, 60, 2.0)
    return store


@pytest.fixture
def bus(redis_client: redis.Redis, store: RunStore) -> RecordAtSend:
    return RecordAtSend(redis_client, store)


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


def reporter_for(store: RunStore, bus: EventBus, clock: StepClock, last_seq: int = 0) -> RunReporter:
    return RunReporter(
        run_id=RUN_ID, user_id=USER_ID, holder=HOLDER, store=store, bus=bus, last_seq=last_seq, clock=clock
    )


def record_of(store: RunStore) -> RunRecord:
    record = store.get(RUN_ID)
    assert record is not None
    return record


def started() -> TrainStarted:
    return TrainStarted(
        request_id=RUN_ID,
        run_id=RUN_ID,
        user_id=USER_ID,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=2,
        queue="training",
    )


def progress(step: int = 5, **extra: float) -> TrainProgress:
    return TrainProgress(
        request_id=RUN_ID,
        run_id=RUN_ID,
        user_id=USER_ID,
        epoch=1,
        total_epochs=2,
        step=step,
        loss=2.5,
        samples_per_sec=extra.get("samples_per_sec"),
        tokens_per_sec=extra.get("tokens_per_sec"),
    )


def completed(loss: float = 1.5) -> TrainCompleted:
    return TrainCompleted(
        request_id=RUN_ID,
        run_id=RUN_ID,
        user_id=USER_ID,
        loss=loss,
        perplexity=4.48,
        artifact_path="/var/artifacts/models/run-1",
    )


def test_events_are_stamped_from_last_seq_with_unique_ids_and_the_clock(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock, last_seq=4)
    reporter.started(started())
    reporter.progress(progress(step=1))
    reporter.progress(progress(step=2))
    reporter.completed(completed())
    events = sent_events(redis_client)
    assert [type(event) for event in events] == [TrainStarted, TrainProgress, TrainProgress, TrainCompleted]
    assert [event.seq for event in events] == [5, 6, 7, 8]
    event_ids = [event.event_id for event in events]
    assert all(isinstance(event_id, str) and len(event_id) == 32 for event_id in event_ids)
    assert len(set(event_ids)) == 4
    # completed() reads the clock once for the record's finished_at, then once for the event.
    assert [event.ts for event in events] == [1000.0, 1001.0, 1002.0, 1004.0]
    assert all(event.run_id == RUN_ID and event.user_id == USER_ID for event in events)
    assert redis_client.hget(run_key(RUN_ID), "last_seq") == b"8"


def test_completed_writes_the_record_before_sending(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock)
    reporter.completed(completed(loss=1.25))
    assert reporter.finished is True
    at_send = bus.records[-1]
    assert at_send is not None
    assert at_send.status == "completed"
    assert at_send.loss == 1.25
    assert at_send.perplexity == 4.48
    assert at_send.artifact_path == "/var/artifacts/models/run-1"
    assert at_send.finished_at == 1000.0
    # Sending adds only the event's sequence number to the record.
    assert record_of(store) == dataclasses.replace(at_send, last_seq=1)


def test_completed_twice_records_and_sends_once(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock)
    reporter.completed(completed(loss=1.25))
    reporter.completed(completed(loss=9.0))
    reporter.failed("system", "too late")
    events = sent_events(redis_client)
    assert [type(event) for event in events] == [TrainCompleted]
    record = record_of(store)
    assert record.status == "completed"
    assert record.loss == 1.25
    assert record.finished_at == 1000.0


def test_failed_records_and_sends_one_failed_event(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock)
    reporter.failed("user", "the corpus is empty")
    reporter.failed("system", "second call")
    reporter.completed(completed())
    at_send = bus.records[-1]
    assert at_send is not None
    assert at_send.status == "failed"
    [event] = sent_events(redis_client)
    assert event == TrainFailed(
        request_id=RUN_ID,
        run_id=RUN_ID,
        user_id=USER_ID,
        event_id=event.event_id,
        seq=1,
        ts=1001.0,
        error_kind="user",
        message="the corpus is empty",
        status="failed",
    )
    record = record_of(store)
    assert (record.status, record.error_kind, record.message) == ("failed", "user", "the corpus is empty")
    assert record.finished_at == 1000.0
    assert record.loss is None


def test_failed_with_a_user_error_keeps_its_message(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter_for(store, bus, clock).failed_with(UserError("use a smaller batch_size"))
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.error_kind, event.status, event.message) == ("user", "failed", "use a smaller batch_size")
    record = record_of(store)
    assert (record.status, record.error_kind, record.message) == (
        "failed",
        "user",
        "use a smaller batch_size",
    )


def test_failed_with_run_canceled_ends_canceled(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock)
    reporter.failed_with(RunCanceled())
    reporter.failed_with(UserError("after the cancel"))
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.status, event.error_kind) == ("canceled", "user")
    assert "canceled" in event.message
    record = record_of(store)
    assert record.status == "canceled"
    assert record.error_kind == "user"


@pytest.mark.parametrize(
    "exc", [RuntimeError("password=hunter2"), KeyError("hunter2"), MemoryError("hunter2")]
)
def test_failed_with_any_other_exception_is_ours_and_hides_its_text(
    exc: BaseException, store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter_for(store, bus, clock).failed_with(exc)
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.error_kind, event.status) == ("system", "failed")
    assert type(exc).__name__ in event.message
    assert RUN_ID in event.message
    assert "hunter2" not in event.message
    record = record_of(store)
    assert (record.status, record.error_kind, record.message) == ("failed", "system", event.message)


def test_progress_saves_the_summary_in_the_record(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    reporter = reporter_for(store, bus, clock)
    reporter.progress(progress(step=3, samples_per_sec=12.5, tokens_per_sec=200.0))
    assert record_of(store).progress == {
        "epoch": 1,
        "total_epochs": 2,
        "step": 3,
        "loss": 2.5,
        "ts": 1000.0,
        "samples_per_sec": 12.5,
        "tokens_per_sec": 200.0,
    }
    reporter.progress(progress(step=4))
    assert record_of(store).progress == {"epoch": 1, "total_epochs": 2, "step": 4, "loss": 2.5, "ts": 1001.0}
    assert [event.seq for event in sent_events(redis_client)] == [1, 2]
    assert record_of(store).status == "running"


@pytest.mark.parametrize("ended", ["completed", "failed", "canceled"])
def test_completed_of_a_run_that_already_ended_sends_nothing(
    ended: RunStatus, store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    assert store.finish(RUN_ID, ended, "ended elsewhere", 50.0)
    reporter = reporter_for(store, bus, clock)
    reporter.completed(completed())
    assert reporter.finished is True
    assert sent_events(redis_client) == []
    record = record_of(store)
    assert (record.status, record.message, record.finished_at, record.loss) == (
        ended,
        "ended elsewhere",
        50.0,
        None,
    )
    # Finished for good: a later failure is not recorded or sent either.
    reporter.failed("system", "late")
    assert sent_events(redis_client) == []
    assert record_of(store).message == "ended elsewhere"


def test_failed_of_a_run_that_is_no_longer_running_sends_nothing(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    # Another executor's shutdown handed the run back to the queue: this one no longer owns its ending.
    assert store.transition(RUN_ID, ("running",), "queued", {"message": "requeued"})
    reporter = reporter_for(store, bus, clock)
    reporter.failed_with(UserError("the corpus is too small"))
    assert reporter.finished is True
    assert sent_events(redis_client) == []
    record = record_of(store)
    assert (record.status, record.message, record.error_kind) == ("queued", "requeued", None)


def test_failed_of_a_deleted_run_sends_nothing(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    redis_client.delete(run_key(RUN_ID))
    reporter = reporter_for(store, bus, clock)
    reporter.failed("system", "gone")
    assert reporter.finished is True
    assert sent_events(redis_client) == []
    assert not redis_client.exists(run_key(RUN_ID))


@pytest.fixture
def unreachable() -> Iterator[redis.Redis]:
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    yield client
    client.close()


def test_a_redis_error_while_saving_progress_does_not_raise(
    unreachable: redis.Redis,
    bus: RecordAtSend,
    clock: StepClock,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reporter = reporter_for(RunStore(unreachable), bus, clock)
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.reporting"):
        reporter.progress(progress(step=7))
    # The event still goes out on the (healthy) bus.
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainProgress)
    assert event.step == 7
    assert any("progress of run run-1 not recorded" in record.getMessage() for record in caplog.records)


def test_a_failure_redis_never_records_is_left_to_the_lease(
    unreachable: redis.Redis,
    store: RunStore,
    bus: RecordAtSend,
    clock: StepClock,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = RunReporter(
        run_id=RUN_ID,
        user_id=USER_ID,
        holder=HOLDER,
        store=RunStore(unreachable),
        bus=bus,
        clock=clock,
        end_patience_s=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.reporting"):
        broken.failed("system", "could not record")
    # Tried again while Redis stayed away, then given up without raising, saying why.
    messages = [record.getMessage() for record in caplog.records]
    assert len([message for message in messages if "not recorded yet" in message]) >= 2
    assert any("its end (failed) not recorded within 1 s (Error" in message for message in messages)
    assert broken.finished
    # Nothing was sent for an ending that was never recorded; the run stays running for its lease to end.
    assert sent_events(redis_client) == []
    assert record_of(store).status == "running"


def test_an_end_after_another_executor_took_the_run_over_is_neither_recorded_nor_sent(
    store: RunStore, bus: RecordAtSend, clock: StepClock, redis_client: redis.Redis
) -> None:
    # This attempt's lease ended (Redis away longer than it, say) and worker-b took the run up again.
    store.release(RUN_ID, HOLDER)
    assert store.claim(RUN_ID, "worker-b", 60, 3.0)
    reporter = reporter_for(store, bus, clock)
    reporter.completed(completed())
    assert reporter.finished
    assert sent_events(redis_client) == []
    record = record_of(store)
    assert (record.status, record.worker, record.loss) == ("running", "worker-b", None)
