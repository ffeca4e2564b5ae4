"""trainer_tasks.runner.execute_run and the Celery task wrappers, on the real store and bus."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery.utils.nodenames import gethostname

from schemas.api import TrainRequest
from schemas.events import TrainCompleted, TrainFailed
from schemas.queues import RESUMED_PRIORITY
from schemas.status import RunStatus
from tests.streams import sent_events
from trainer_store.cache import FileCache
from trainer_store.jobs import JobStore
from trainer_store.layout import FileStores, model_folder
from trainer_store.runs import RedisValue, RunRecord, RunStore, lease_key, run_key
from trainer_store.settings import Settings
from trainer_tasks import resources, tasks
from trainer_tasks.app import TRAIN_TASK, app, celery_app
from trainer_tasks.errors import LeaseLost, RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.runner import (
    MAX_ATTEMPTS,
    RunContext,
    TrainFn,
    Worker,
    end_canceled_queued_run,
    execute_run,
    load_training,
)

RUN_ID = "run-1"
USER_ID = 123456789012345678
HOLDER = "host:1:abcd"


def request_mapping(corpus: str) -> dict[str, object]:
    return TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=16,
        num_epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        corpus_path=corpus,
        tokenizer_id="auto",
        user_id=USER_ID,
        seed=1337,
    ).to_mapping()


class Requeued:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, run_id: str, queue: str, delay_s: float) -> None:
        self.calls.append((run_id, queue, delay_s))


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
        redis=redis_client,
        store=RunStore(redis_client),
        jobs=JobStore(redis_client),
        bus=EventBus(redis_client, settings.events_stream_maxlen),
        files=FileStores.from_settings(settings),
        cache=FileCache(settings.cache_root, settings.cache_max_bytes),
        holder=HOLDER,
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
            request=request_mapping("notes.txt"),
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
            artifact_path=context.files.artifacts.url(model_folder(context.run_id)),
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


def test_a_delivery_that_finds_the_run_held_does_nothing_and_sends_nothing(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.set(lease_key(RUN_ID), "host:2:ffff", px=60_000)
    training = FakeTraining(never_called)
    worker = make_worker(worker_settings, redis_client, requeued, training)
    assert execute_run(RUN_ID, worker) == "held-elsewhere"
    assert training.contexts == []
    # No message of its own: if the holder is dead, the periodic check sends the run back.
    assert requeued.calls == []
    record = record_of(store)
    assert (record.status, record.attempt) == ("queued", 0)
    assert redis_client.get(lease_key(RUN_ID)) == b"host:2:ffff"
    assert sent_events(redis_client) == []
    redis_client.delete(lease_key(RUN_ID))  # the holder's lease expires: a later delivery trains it
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(completes))
    assert execute_run(RUN_ID, worker) == "completed"
    assert record_of(store).attempt == 1


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


def test_a_queued_run_canceled_by_its_user_ends_at_once_and_says_so(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), mapping={"cancel_requested": "1", "last_seq": 4})
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(never_called))
    assert end_canceled_queued_run(RUN_ID, worker) == "canceled"
    record = record_of(store)
    assert (record.status, record.error_kind) == ("canceled", "user")
    assert record.message == "canceled at the user's request before training started"
    assert record.finished_at is not None
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert (event.status, event.error_kind, event.user_id, event.seq) == ("canceled", "user", USER_ID, 5)
    assert store.counts()["queued"] == 0
    # The training worker's delivery that comes later finds it ended and does nothing.
    assert execute_run(RUN_ID, worker) == "canceled"
    assert len(sent_events(redis_client)) == 1


def test_a_canceled_run_a_worker_took_first_is_left_to_that_worker(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(never_called))
    assert end_canceled_queued_run(RUN_ID, worker) == "missing"
    create_run()
    assert store.claim(RUN_ID, HOLDER, 30.0, time.time(), "training@a")
    redis_client.hset(run_key(RUN_ID), "cancel_requested", "1")
    assert end_canceled_queued_run(RUN_ID, worker) == "running"
    assert record_of(store).status == "running"
    assert sent_events(redis_client) == []


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
    # Nothing is reported nor sent (the periodic check resumes a run nobody holds), and the new
    # holder's lease is left alone.
    assert sent_events(redis_client) == []
    assert requeued.calls == []
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
    assert requeued.calls == []
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
    """Redis refusing the result (not away: that is waited out) leaves the reporter unfinished; the runner
    reports it."""
    create_run()
    worker = make_worker(worker_settings, redis_client, requeued, FakeTraining(completes))
    real_finish = worker.store.finish
    calls: list[tuple[str, str]] = []

    def flaky_finish(
        run_id: str, status: RunStatus, message: str, now: float, *, holder: str = "", **metrics: RedisValue
    ) -> bool:
        calls.append((status, holder))
        if status == "completed":
            raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")
        return real_finish(run_id, status, message, now, holder=holder, **metrics)

    monkeypatch.setattr(worker.store, "finish", flaky_finish)
    assert execute_run(RUN_ID, worker) == "failed"
    # Each end is recorded as the attempt that holds the lease.
    assert calls == [("completed", HOLDER), ("failed", HOLDER)]
    record = record_of(store)
    assert (record.status, record.error_kind) == ("failed", "system")
    assert "ResponseError" in record.message
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
    assert context.request == TrainRequest.from_mapping(request_mapping("notes.txt"))
    assert context.files.runs.url() == worker_settings.runs_root
    assert context.files.artifacts.url() == worker_settings.artifacts_root
    assert context.cache.root == worker_settings.cache_root
    assert context.queue == "training"
    # Called outside a Celery worker: the holder names it, and it may use every core.
    assert (context.worker, context.torch_threads) == (HOLDER, resources.available_cpus())
    assert record_of(store).worker == HOLDER
    assert context.progress_interval_s == 0.5
    assert context.reporter.run_id == RUN_ID
    assert context.reporter.user_id == USER_ID
    assert seen_cancel == [False, True]
    # The heartbeat ran beside the training.
    assert (record_of(store).last_heartbeat_ts or 0.0) > 1.0


def test_the_time_limit_counts_the_earlier_attempts_and_a_dead_one(
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
) -> None:
    create_run()
    # Earlier attempts trained 100 s; the last one died 0.2 s after its claim, its last heartbeat.
    assert store.claim(RUN_ID, "host:2:dead", 0.001, 50.0)
    redis_client.hset(run_key(RUN_ID), mapping={"train_s": 100.0, "last_heartbeat_ts": 50.2})
    time.sleep(0.01)  # its lease expires
    settings = dataclasses.replace(worker_settings, max_run_s=101.0, checkpoint_interval_s=7.0)
    seen: list[bool] = []

    def body(context: RunContext) -> None:
        seen.append(context.over_time_limit())
        time.sleep(1.0)  # past the 0.8 s left
        seen.append(context.over_time_limit())
        completes(context)

    training = FakeTraining(body)
    assert execute_run(RUN_ID, make_worker(settings, redis_client, requeued, training)) == "completed"
    [context] = training.contexts
    assert (context.max_run_s, context.checkpoint_interval_s) == (101.0, 7.0)
    assert seen == [False, True]
    record = record_of(store)
    assert record.attempt == 2
    assert record.train_s > 101.0


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
    assert requeued.calls == [(RUN_ID, "training", 0)]
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
    assert worker.settings.runs_root == str(worker_env / "env-runs")
    assert worker.settings.artifacts_root == str(worker_env / "env-artifacts")
    assert worker.files.runs.url() == str(worker_env / "env-runs")
    assert worker.cache.root == worker_env / "env-cache"
    assert worker.redis.ping()
    assert worker.settings.lease_s == 42.0
    assert worker.settings.events_stream_maxlen == 123
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


def test_the_celery_task_records_the_worker_that_took_the_run(
    worker_env: Path, store: RunStore, create_run: Callable[[], RunRecord], redis_client: redis.Redis
) -> None:
    create_run()
    redis_client.hset(run_key(RUN_ID), "cancel_requested", "1")  # claimed, then ends before training
    # apply() runs the task in this process as a worker would, under this machine's name.
    assert tasks.train.apply(args=(RUN_ID,)).result == "canceled"
    assert record_of(store).worker == gethostname()


class SendTaskRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], str, int, float | None, bool]] = []

    def __call__(
        self,
        name: str,
        args: list[str],
        queue: str,
        priority: int,
        countdown: float | None,
        ignore_result: bool,
    ) -> None:
        self.calls.append((name, args, queue, priority, countdown, ignore_result))


def test_requeue_sends_the_run_to_its_queue_ahead_now_or_after_the_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = SendTaskRecorder()
    monkeypatch.setattr(celery_app, "send_task", recorder)
    tasks.requeue("run-9", "training", 0)
    tasks.requeue("run-9", "gpu", 60.0)
    assert recorder.calls == [
        (TRAIN_TASK, ["run-9"], "training", RESUMED_PRIORITY, None, True),
        (TRAIN_TASK, ["run-9"], "gpu", RESUMED_PRIORITY, 60.0, True),
    ]


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
    # A broker blip does not cancel a training that its lease still protects.
    assert celery_app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert celery_app.conf.broker_transport_options["visibility_timeout"] == 12 * 3600


@contextlib.contextmanager
def faulty_store(fault: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The endpoint of a store that takes connections and never answers, or that refuses our credentials."""
    if fault == "wrong credentials":
        yield request.getfixturevalue("wrong_credentials")
        return
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


@pytest.mark.parametrize("fault", ["silent", "wrong credentials"])
def test_a_store_that_does_not_answer_or_refuses_fails_the_run_within_a_minute_naming_the_store(
    fault: str,
    request: pytest.FixtureRequest,
    worker_settings: Settings,
    redis_client: redis.Redis,
    requeued: Requeued,
    store: RunStore,
    create_run: Callable[[], RunRecord],
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_run()
    with faulty_store(fault, request) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        settings = dataclasses.replace(
            worker_settings,
            corpus_root="s3://silent-bucket/corpora",
            artifacts_root="s3://silent-bucket/artifacts",
            runs_root="s3://silent-bucket/runs",
            store_timeout_s=2.0,
        )
        worker = dataclasses.replace(
            make_worker(settings, redis_client, requeued, FakeTraining(never_called)), train=load_training
        )
        began = time.monotonic()
        assert execute_run(RUN_ID, worker) == "failed"
        elapsed = time.monotonic() - began
    assert elapsed < 60
    record = record_of(store)
    assert record.error_kind == "system"
    assert record.message.startswith(
        f"the run could not use the object store s3://silent-bucket/corpora at {endpoint}: "
    )
    [event] = sent_events(redis_client)
    assert isinstance(event, TrainFailed)
    assert event.message == record.message
