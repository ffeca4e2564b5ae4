"""trainer_tasks.runner.execute_run and the Celery task wrappers, on the real store and bus."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from schemas.api import TrainRequest
from schemas.events import TrainCompleted, TrainFailed
from schemas.jobs import JobStore
from schemas.runs import RedisValue, RunRecord, RunStatus, RunStore, lease_key, run_key
from schemas.settings import Settings
from tests.streams import sent_events
from trainer_tasks import tasks
from trainer_tasks.app import TRAIN_TASK, app, celery_app
from trainer_tasks.errors import LeaseLost, RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.runner import MAX_ATTEMPTS, RunContext, TrainFn, Worker, execute_run, load_training

RUN_ID = "run-1"
USER_ID = 123456789012345678
HOLDER = "host:1:abcd"


def request_mapping(corpus: Path) -> dict[str, object]:
    return TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=16,
        num_epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        corpus_path=str(corpus),
        tokenizer_id="auto",
        user_id=USER_ID,
        seed=1337,
    ).to_mapping()


class Requeued:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, run_id: str, delay_s: float) -> None:
        self.calls.append((run_id, delay_s))


class FakeTraining:
    """Stands in for trainer_tasks.training.train: records its contexts, then does what it is told."""

    def __init__(self, body: Callable[[RunContext], None]) -> None:
        self.body = body
        self.contexts: list[RunContext] = []

    def load(self) -> TrainFn:
        return self.run

    def run(self, context: RunContext) -> None:
        self.contexts.append(context)
        self.body(context)


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    return RunStore(redis_client)


@pytest.fixture
def requeued() -> Requeued:
    return Requeued()


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, heartbeat_interval_s=0.01, lease_s=30.0, progress_interval_s=0.5)


def make_worker(
    settings: Settings, redis_client: redis.Redis, requeued: Requeued, training: FakeTraining
) -> Worker:
    return Worker(
        settings=settings,
        store=RunStore(redis_client),
        jobs=JobStore(redis_client),
        bus=EventBus(redis_client, settings.events_stream_maxlen),
        holder=HOLDER,
        queue="training",
        requeue=requeued,
        train=training.load,
    )


@pytest.fixture
def create_run(store: RunStore, corpus_root: Path) -> Callable[[], RunRecord]:
    def create() -> RunRecord:
        return store.create(
            run_id=RUN_ID,
            job_id="job-1",
            user_id=USER_ID,
            request=request_mapping(corpus_root / "notes.txt"),
            now=1.0,
        )

    return create


def record_of(store: RunStore) -> RunRecord:
    record = store.get(RUN_ID)
    assert record is not None
    return record


def completes(context: RunContext) -> None:
    context.reporter.completed(
        TrainCompleted(
            request_id=context.run_id,
            run_id=context.run_id,
            user_id=context.request.user_id,
            loss=1.5,
            perplexity=4.48,
            artifact_path=str(context.artifact_dir),
        )
    )


def raises(exc: BaseException) -> Callable[[RunContext], None]:
    def body(context: RunContext) -> None:
        raise exc

    return body


def never_called(context: RunContext) -> None:
    raise AssertionError("train must not be called")


def test_missing_record(worker_settings: Settings, redis_client: redis.Redis, requeued: Requeued) -> None:
    training = FakeTraining(never_called)
    assert execute_run("nope", make_worker(worker_settings, redis_client, requeued, training)) == "missing"
    assert training.contexts == []
    assert not redis_client.exists(lease_key("nope"))


@pytest.mark.parametrize("status", ["completed", "failed", "canceled"])
def test_a_terminal_record_is_answered_without_training(
    status: str,
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "status", status)
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == status
    assert training.contexts == []
    assert not redis_client.exists(lease_key(RUN_ID))
    assert record_of(store).attempt == 0


def test_a_lease_held_by_another_executor_defers_the_delivery_by_a_lease(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.set(lease_key(RUN_ID), "host:2:ffff", px=60_000)
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "deferred"
    assert training.contexts == []
    # Looked at again once a dead holder's lease would have expired.
    assert requeued.calls == [(RUN_ID, worker_settings.lease_s)]
    record = record_of(store)
    assert (record.status, record.attempt) == ("queued", 0)
    assert redis_client.get(lease_key(RUN_ID)) == b"host:2:ffff"
    assert sent_events(redis_client) == []


def test_a_deferred_delivery_trains_once_the_lease_is_gone(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.set(lease_key(RUN_ID), "host:2:ffff", px=60_000)
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(completes))
    assert execute_run(RUN_ID, worker) == "deferred"
    redis_client.delete(lease_key(RUN_ID))  # the dead holder's lease expires
    assert execute_run(RUN_ID, worker) == "completed"
    assert record_of(store).attempt == 1
    assert requeued.calls == [(RUN_ID, worker_settings.lease_s)]


@pytest.mark.parametrize("previous_attempts", [0, MAX_ATTEMPTS - 1])
def test_a_run_is_trained_up_to_max_attempts(
    previous_attempts: int,
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "attempt", previous_attempts)
    training = FakeTraining(completes)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "completed"
    assert len(training.contexts) == 1
    assert record_of(store).attempt == previous_attempts + 1


@pytest.mark.parametrize("previous_attempts", [MAX_ATTEMPTS, MAX_ATTEMPTS + 3])
def test_a_run_that_keeps_losing_its_worker_fails_as_ours(
    previous_attempts: int,
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "attempt", previous_attempts)
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "failed"
    assert training.contexts == []
    record = record_of(store)
    assert (record.status, record.error_kind) == ("failed", "system")
    assert record.message == f"the run lost its worker {MAX_ATTEMPTS} times; it is not tried again"
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.error_kind, event.status, event.message) == ("system", "failed", record.message)
    assert not redis_client.exists(lease_key(RUN_ID))
    assert requeued.calls == []


def test_a_cancel_wins_over_the_attempt_limit(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), mapping={"attempt": MAX_ATTEMPTS, "cancel_requested": "1"})
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "canceled"
    assert (record_of(store).status, record_of(store).error_kind) == ("canceled", "user")


def test_a_lost_lease_ends_the_delivery_without_reporting(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    seen: list[bool] = []

    def body(context: RunContext) -> None:
        seen.append(context.lease_lost())
        # Another executor takes the run over; the heartbeat notices at its next renewal.
        redis_client.set(lease_key(RUN_ID), "host:2:ffff", px=60_000)
        deadline = time.monotonic() + 5.0
        while not context.lease_lost() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(context.lease_lost())
        raise LeaseLost("taken over")

    training = FakeTraining(body)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "lease-lost"
    assert seen == [False, True]
    # Nothing is reported; a look after the lease time finds whether anyone still trains the run,
    # and the new holder's lease is left alone.
    assert sent_events(redis_client) == []
    assert requeued.calls == [(RUN_ID, worker_settings.lease_s)]
    record = record_of(store)
    assert (record.status, record.finished_at) == ("running", None)
    assert redis_client.get(lease_key(RUN_ID)) == b"host:2:ffff"


def test_a_lease_lost_while_still_held_is_released(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(raises(LeaseLost("taken over")))
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "lease-lost"
    assert sent_events(redis_client) == []
    assert record_of(store).status == "running"
    assert not redis_client.exists(lease_key(RUN_ID))


def test_a_completion_the_store_cannot_record_is_reported_as_a_failure(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis error while writing the result leaves the reporter unfinished; the runner reports it."""
    create_run()
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(completes))
    real_finish = worker.store.finish
    calls: list[str] = []

    def flaky_finish(run_id: str, status: RunStatus, message: str, now: float, **metrics: RedisValue) -> bool:
        calls.append(status)
        if status == "completed":
            raise redis.ConnectionError("connection reset")
        return real_finish(run_id, status, message, now, **metrics)

    monkeypatch.setattr(worker.store, "finish", flaky_finish)
    assert execute_run(RUN_ID, worker) == "failed"
    assert calls == ["completed", "failed"]
    record = record_of(store)
    assert (record.status, record.error_kind) == ("failed", "system")
    assert "ConnectionError" in record.message
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert not redis_client.exists(lease_key(RUN_ID))


def test_a_run_that_completes(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(completes)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "completed"
    record = record_of(store)
    assert (record.status, record.attempt, record.loss) == ("completed", 1, 1.5)
    assert record.started_at is not None
    assert redis_client.hget(run_key(RUN_ID), "worker") == HOLDER.encode()
    assert not redis_client.exists(lease_key(RUN_ID))
    events = sent_events(redis_client)
    assert [type(event) for event in events] == [TrainCompleted]
    assert events[0].seq == 1
    assert requeued.calls == []


def test_the_context_carries_the_request_dirs_and_cancel_flag(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
    corpus_root: Path,
) -> None:
    create_run()
    seen_cancel: list[bool] = []

    def body(context: RunContext) -> None:
        assert redis_client.get(lease_key(RUN_ID)) == HOLDER.encode()
        assert record_of(store).status == "running"
        seen_cancel.append(context.cancel_requested())
        assert context.lease_lost() is False
        redis_client.hset(run_key(RUN_ID), "cancel_requested", "1")
        deadline = time.monotonic() + 5.0
        while not context.cancel_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_cancel.append(context.cancel_requested())
        context.reporter.failed_with(RunCanceled())

    training = FakeTraining(body)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "canceled"
    [context] = training.contexts
    assert context.run_id == RUN_ID
    assert context.request == TrainRequest.from_mapping(request_mapping(corpus_root / "notes.txt"))
    assert context.run_dir == worker_settings.runs_root / RUN_ID
    assert context.artifact_dir == worker_settings.artifacts_root / "models" / RUN_ID
    assert context.queue == "training"
    assert context.progress_interval_s == 0.5
    assert context.reporter.run_id == RUN_ID
    assert context.reporter.user_id == USER_ID
    assert context.tokenizer_path is None
    assert seen_cancel == [False, True]
    # The heartbeat ran beside the training.
    assert (record_of(store).last_heartbeat_ts or 0.0) > 1.0


def test_a_cancel_before_training_ends_canceled_without_training(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "cancel_requested", "1")
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "canceled"
    assert training.contexts == []
    record = record_of(store)
    assert (record.status, record.error_kind, record.attempt) == ("canceled", "user", 1)
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.status, event.error_kind) == ("canceled", "user")
    assert not redis_client.exists(lease_key(RUN_ID))


def test_a_trained_tokenizer_is_handed_to_the_training(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    corpus_root: Path,
) -> None:
    mapping = {**request_mapping(corpus_root / "notes.txt"), "tokenizer_id": "tok-1"}
    store.create(run_id=RUN_ID, job_id="job-1", user_id=USER_ID, request=mapping, now=1.0)
    training = FakeTraining(completes)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "completed"
    [context] = training.contexts
    assert context.tokenizer_path == worker_settings.tokenizer_dir("tok-1") / "tokenizer.json"


def test_events_continue_the_records_sequence(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "last_seq", 6)
    training = FakeTraining(completes)
    execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training))
    assert [event.seq for event in sent_events(redis_client)] == [7]


def test_a_user_error_fails_the_run_as_the_users(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(raises(UserError("the corpus is too small")))
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "failed"
    record = record_of(store)
    assert (record.error_kind, record.message) == ("user", "the corpus is too small")
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.error_kind, event.status, event.message) == ("user", "failed", "the corpus is too small")
    assert not redis_client.exists(lease_key(RUN_ID))


def test_an_internal_error_fails_the_run_as_ours_without_its_text(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(raises(RuntimeError("secret")))
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "failed"
    record = record_of(store)
    assert record.error_kind == "system"
    assert "RuntimeError" in record.message
    assert "secret" not in record.message
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert "secret" not in event.message
    assert not redis_client.exists(lease_key(RUN_ID))


def test_a_request_the_worker_cannot_read_fails_as_ours(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
) -> None:
    store.create(run_id=RUN_ID, job_id="job-1", user_id=USER_ID, request={"model_family": 3}, now=1.0)
    training = FakeTraining(never_called)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "failed"
    assert training.contexts == []
    record = record_of(store)
    assert record.error_kind == "system"
    assert "TypeError" in record.message


def test_a_shutdown_hands_the_run_back_to_the_queue(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(raises(SystemExit(1)))
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "requeued"
    record = record_of(store)
    assert record.status == "queued"
    assert record.message == "requeued after a worker shutdown"
    assert record.finished_at is None
    assert record.attempt == 0, "a graceful hand-back does not count as an attempt"
    assert requeued.calls == [(RUN_ID, 0)]
    assert not redis_client.exists(lease_key(RUN_ID))
    assert sent_events(redis_client) == []
    # The requeued delivery can claim the run again.
    again = FakeTraining(completes)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, again)) == "completed"
    assert record_of(store).attempt == 1


def test_a_train_that_reports_nothing_fails_as_ours(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    training = FakeTraining(lambda context: None)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "failed"
    record = record_of(store)
    assert record.error_kind == "system"
    assert "without reporting" in record.message
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert "without reporting" in event.message


def test_a_record_deleted_after_the_result_answers_missing_and_is_not_recreated(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    lost: list[bool] = []

    def body(context: RunContext) -> None:
        completes(context)
        redis_client.delete(run_key(RUN_ID))
        # The heartbeat keeps beating: it finds no record, writes nothing and reports the lease lost.
        deadline = time.monotonic() + 5.0
        while not context.lease_lost() and time.monotonic() < deadline:
            time.sleep(0.01)
        lost.append(context.lease_lost())

    training = FakeTraining(body)
    assert execute_run(RUN_ID, make_worker(worker_settings, redis_client, requeued, training)) == "missing"
    assert lost == [True]
    assert not redis_client.exists(lease_key(RUN_ID))
    assert not redis_client.exists(run_key(RUN_ID))


def test_load_training_answers_the_real_train() -> None:
    from trainer_tasks.training import train

    assert load_training() is train


# trainer_tasks.tasks: the Celery wrappers


def test_worker_services_are_built_from_the_environment(worker_env: Path, redis_url: str) -> None:
    worker = tasks.worker_services()
    assert worker.settings.redis_url == redis_url
    assert worker.settings.runs_root == worker_env / "env-runs"
    assert worker.settings.artifacts_root == worker_env / "env-artifacts"
    assert worker.settings.lease_s == 42.0
    assert worker.settings.events_stream_maxlen == 123
    assert worker.queue == "training"
    assert worker.requeue is tasks.requeue
    assert worker.train is load_training
    hostname, pid, suffix = worker.holder.split(":")
    assert (hostname, pid, len(suffix)) == (socket.gethostname(), str(os.getpid()), 8)
    assert worker.store.ping()
    assert isinstance(worker.jobs, JobStore)
    # Built once per process.
    assert tasks.worker_services() is worker


def test_the_celery_task_runs_a_terminal_record_to_its_status(
    worker_env: Path, store: RunStore, create_run: Callable[[], RunRecord], redis_client: redis.Redis
) -> None:
    create_run()
    assert store.transition(RUN_ID, ("queued",), "canceled", {"message": "canceled before it started"})
    assert tasks.train.run(RUN_ID) == "canceled"
    assert tasks.train.run("unknown") == "missing"
    assert record_of(store).attempt == 0
    assert not redis_client.exists(lease_key(RUN_ID))


class SendTaskRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], float | None]] = []

    def __call__(self, name: str, args: list[str], countdown: float | None) -> None:
        self.calls.append((name, args, countdown))


def test_requeue_sends_the_train_task_by_name_now_or_after_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = SendTaskRecorder()
    monkeypatch.setattr(celery_app, "send_task", recorder)
    tasks.requeue("run-9", 0)
    tasks.requeue("run-9", 60.0)
    assert recorder.calls == [(TRAIN_TASK, ["run-9"], None), (TRAIN_TASK, ["run-9"], 60.0)]


def test_the_celery_app_is_configured_for_long_training() -> None:
    assert app is celery_app
    assert celery_app.main == "trainer"
    assert TRAIN_TASK == "trainer.train"
    assert tasks.train.name == TRAIN_TASK
    assert TRAIN_TASK in celery_app.tasks
    assert celery_app.conf.task_default_queue == "training"
    assert celery_app.conf.task_acks_late is True
    # A dead pool process's run goes back to the queue; the attempt limit ends a crash loop.
    assert celery_app.conf.task_reject_on_worker_lost is True
    assert celery_app.conf.worker_prefetch_multiplier == 1
