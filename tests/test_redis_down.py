"""Redis away as a request arrives, before a run's task is sent, or as a run or a job ends (a real Redis)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.test import TestResponse

from schemas.events import TrainCompleted, TrainEvent, TrainFailed
from schemas.queues import broker_lists
from schemas.status import RunStatus
from scripts import devstack
from tests.conftest import celery_on
from tests.streams import sent_events
from tests.test_api import SNOWFLAKE, assert_envelope, json_of, submit, valid_body
from trainer_api import create_app, limits
from trainer_api.idempotency import HEADER, PENDING_S, record_key
from trainer_api.services import Task, sender
from trainer_store.jobs import JobStore, evaluation_key
from trainer_store.outages import LONGEST_PAUSE_S
from trainer_store.records import text
from trainer_store.runs import NEVER_SENT_MESSAGE, UNSENT_RUNS_KEY, RedisValue, RunStore, run_key
from trainer_store.settings import Settings
from trainer_tasks.app import TRAIN_TASK
from trainer_tasks.errors import UserError
from trainer_tasks.events import EventBus
from trainer_tasks.jobs import JobEnd, run_job
from trainer_tasks.reporting import RunReporter

# A request to an API whose Redis is away answers within this (the client's timeouts and retries).
PROMPT_S = 5.0
# How long the test keeps Redis away from a run that has just ended.
OUTAGE_S = 2.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[devstack.Service, str, Path]]:
    """A Redis of this test's own, with an append-only file, that the test may stop and start again."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    service, url = devstack.start_redis(workdir, append_only=True)
    yield service, url, workdir
    service.stop()


def restart(url: str, workdir: Path) -> devstack.Service:
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    service, _ = devstack.start_redis(workdir, port=port, append_only=True)
    return service


def timed_request(
    client: FlaskClient, path: str, body: dict[str, object] | None = None
) -> tuple[float, TestResponse]:
    started = time.monotonic()
    response = client.get(path) if body is None else client.post(path, json=body, headers={HEADER: "k-1"})
    return time.monotonic() - started, response


def test_requests_while_redis_is_down_answer_503_promptly(
    own_redis: tuple[devstack.Service, str, Path], settings: Settings, tmp_path: Path
) -> None:
    service, url, workdir = own_redis
    sent: list[str] = []
    app = create_app(
        Settings(
            redis_url=url,
            corpus_root=settings.corpus_root,
            artifacts_root=str(tmp_path / "a"),
            allow_offline_queues=True,  # no worker: tasks are recorded or sent to this Redis only
        ),
        dispatch=lambda task: sent.append(task.task_id),
    )
    client = app.test_client()
    run_id = json_of(submit(client, valid_body()))["run_id"]
    service.stop()

    for path, body in ((f"/runs/{run_id}", None), ("/runs/train", valid_body()), ("/readyz", None)):
        took, response = timed_request(client, path, body)
        assert took < PROMPT_S, f"{path} took {took:.1f} s"
        assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert len(sent) == 1, "nothing was sent while Redis was down"

    # Redis back: the same app reconnects on its own; its append-only file kept the run.
    restarted = restart(url, workdir)
    try:
        status = client.get(f"/runs/{run_id}")
        assert status.status_code == 200
        assert json_of(status)["status"] == "queued"
        assert submit(client, valid_body(user_id=0), headers={HEADER: "k-1"}).status_code == 202
    finally:
        restarted.stop()


def test_redis_lost_between_the_record_and_the_task_leaves_no_queued_run(
    own_redis: tuple[devstack.Service, str, Path],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis is killed (SIGKILL) after the run's record is written and before its task is sent: the
    send fails, the API answers 503, and once Redis is back the run ends failed instead of waiting."""
    service, url, workdir = own_redis
    monkeypatch.setattr(limits, "UNSENT_GRACE_S", 1.0)
    send = sender(celery_on(url))  # the API's own send, through a Celery app on this test's Redis
    kills: list[int] = []

    def dispatch(task: Task) -> None:
        if not kills:
            os.kill(service.process.pid, signal.SIGKILL)
            service.process.wait()
            kills.append(service.process.pid)
        send(task)

    app = create_app(
        Settings(
            redis_url=url,
            corpus_root=settings.corpus_root,
            artifacts_root=str(tmp_path / "a"),
            allow_offline_queues=True,  # no worker: tasks are recorded or sent to this Redis only
        ),
        dispatch,
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        response = submit(app.test_client(), valid_body(), headers={HEADER: "k-2"})
    took = time.monotonic() - started
    assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert took < PROMPT_S, f"the failed send took {took:.1f} s"
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "not queued, and not marked failed yet" in logged
    assert f"could not free an {HEADER}" in logged

    restarted = restart(url, workdir)
    try:
        client = redis.Redis.from_url(url)
        store = RunStore(client)
        [lost_key] = client.zrange(UNSENT_RUNS_KEY, 0, -1)
        lost_id = text(lost_key).removeprefix(run_key(""))
        record = store.get(lost_id)
        assert record is not None
        assert record.status == "queued", "the record was written, the task was not"
        assert sum(client.llen(name) for name in broker_lists("training")) == 0
        # The key could not be freed with Redis gone; its reservation frees itself within PENDING_S.
        assert 0 < client.pttl(record_key("POST /runs/train", "k-2")) <= PENDING_S * 1000
        time.sleep(1.2)

        # The next request (any process's) fails the run that was never sent; its own run is queued.
        accepted = submit(app.test_client(), valid_body())
        assert accepted.status_code == 202, accepted.get_data(as_text=True)
        lost = store.get(lost_id)
        assert lost is not None
        assert (lost.status, lost.error_kind, lost.message) == ("failed", "system", NEVER_SENT_MESSAGE)
        assert store.counts()["queued"] == 1
        assert store.active_for_user(SNOWFLAKE) == 1
        [message] = [raw for name in broker_lists("training") for raw in client.lrange(name, 0, -1)]
        task = json.loads(message)["headers"]
        assert (task["task"], task["id"]) == (TRAIN_TASK, json_of(accepted)["job_id"])
        client.close()
    finally:
        restarted.stop()


class AroundTheEnd(RunStore):
    """The real store, with something done just before and just after each end it records."""

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        message: str,
        now: float,
        *,
        holder: str = "",
        **metrics: RedisValue,
    ) -> bool:
        self.before_the_end()
        recorded = super().finish(run_id, status, message, now, holder=holder, **metrics)
        self.after_the_end()
        return recorded

    def before_the_end(self) -> None:
        pass

    def after_the_end(self) -> None:
        pass


class StopsRedisAtTheEnd(AroundTheEnd):
    """Redis stopped as a run ends: before its end is recorded, or after it is and before its final event."""

    def __init__(self, client: redis.Redis, service: devstack.Service, before_the_record: bool) -> None:
        super().__init__(client)
        self._service = service
        self._before_the_record = before_the_record

    def before_the_end(self) -> None:
        if self._service.process.poll() is None and self._before_the_record:
            self._service.stop()

    def after_the_end(self) -> None:
        if self._service.process.poll() is None:
            self._service.stop()


class LosesTheFirstAnswer(AroundTheEnd):
    """The answer to the first end recorded lost on its way back, as when Redis fails over right after
    the write."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.tries = 0

    def after_the_end(self) -> None:
        self.tries += 1
        if self.tries == 1:
            raise redis.ConnectionError("Connection closed by server.")


def one_try_client(url: str) -> redis.Redis:
    """No retries of its own: each try of the reporter is one attempt, as on a worker whose Redis is away."""
    return redis.Redis.from_url(url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def running_run(store: RunStore) -> None:
    store.create(run_id="run-1", job_id="job-1", user_id=7, request={}, now=time.time())
    assert store.claim("run-1", "worker-a", 60, time.time())


def completed_event() -> TrainCompleted:
    return TrainCompleted(
        request_id="run-1", run_id="run-1", user_id=7, loss=1.5, perplexity=4.48, artifact_path="/a/run-1"
    )


def complete(reporter: RunReporter) -> None:
    reporter.completed(completed_event())


def cancel(reporter: RunReporter) -> None:
    reporter.failed("user", "canceled by its user", canceled=True)


@pytest.mark.parametrize("before_the_record", [True, False], ids=["before-the-record", "before-the-event"])
@pytest.mark.parametrize(
    ("end", "status", "event_type"),
    [(complete, "completed", TrainCompleted), (cancel, "canceled", TrainFailed)],
)
def test_a_runs_end_waits_for_redis_to_come_back(
    own_redis: tuple[devstack.Service, str, Path],
    end: Callable[[RunReporter], None],
    status: RunStatus,
    event_type: type[TrainEvent],
    before_the_record: bool,
) -> None:
    service, url, workdir = own_redis
    client = one_try_client(url)
    store = StopsRedisAtTheEnd(client, service, before_the_record)
    running_run(store)
    # Patience to spare, but bounded: a Redis that fails to start again fails the test, not hangs it.
    patience_s = OUTAGE_S + LONGEST_PAUSE_S + PROMPT_S
    reporter = RunReporter(
        run_id="run-1",
        user_id=7,
        holder="worker-a",
        store=store,
        bus=EventBus(client, 1000),
        end_patience_s=patience_s,
    )
    restarted: list[devstack.Service] = []
    later = threading.Timer(OUTAGE_S, lambda: restarted.append(restart(url, workdir)))
    later.start()
    started = time.monotonic()
    try:
        end(reporter)
        took = time.monotonic() - started
    finally:
        later.join()
        for again in restarted:
            again.stop()
    assert len(restarted) == 1, "Redis did not start again"
    # Redis was away for OUTAGE_S: the end was recorded and its event went out once it came back, once.
    assert OUTAGE_S <= took < OUTAGE_S + LONGEST_PAUSE_S + PROMPT_S
    events = restarted_events(url, workdir, status)
    assert [(type(event), event.seq) for event in events] == [(event_type, 1)]


def restarted_events(url: str, workdir: Path, status: RunStatus) -> list[TrainEvent]:
    again = restart(url, workdir)
    try:
        client = redis.Redis.from_url(url)
        record = RunStore(client).get("run-1")
        assert record is not None
        assert (record.status, record.last_seq) == (status, 1)
        return sent_events(client)
    finally:
        again.stop()


def test_an_end_whose_answer_was_lost_is_known_as_recorded_when_tried_again(
    own_redis: tuple[devstack.Service, str, Path],
) -> None:
    _, url, _ = own_redis
    client = redis.Redis.from_url(url)
    store = LosesTheFirstAnswer(client)
    running_run(store)
    RunReporter(
        run_id="run-1", user_id=7, holder="worker-a", store=store, bus=EventBus(client, 1000)
    ).completed(completed_event())
    # The second try found the run no longer running, ended at this end's own time: its event goes out.
    assert store.tries == 2
    record = store.get("run-1")
    assert record is not None
    assert (record.status, record.loss) == ("completed", 1.5)
    assert [type(event) for event in sent_events(client)] == [TrainCompleted]


@pytest.mark.parametrize(
    ("before_the_record", "logger", "logged", "status"),
    [
        # Still running, as far as Redis knows: once its lease expires the run is taken up again.
        (True, "trainer_tasks.reporting", "run-1: its end (completed) not recorded within 1 s (", "running"),
        # The end was recorded before Redis went away; its user is not told.
        (False, "trainer_tasks.events", "not delivered within 1 s (", "completed"),
    ],
    ids=["before-the-record", "before-the-event"],
)
def test_an_end_redis_stays_away_from_is_given_up_after_its_patience_and_logged(
    own_redis: tuple[devstack.Service, str, Path],
    caplog: pytest.LogCaptureFixture,
    before_the_record: bool,
    logger: str,
    logged: str,
    status: RunStatus,
) -> None:
    service, url, workdir = own_redis
    client = one_try_client(url)
    store = StopsRedisAtTheEnd(client, service, before_the_record)
    running_run(store)
    reporter = RunReporter(
        run_id="run-1",
        user_id=7,
        holder="worker-a",
        store=store,
        bus=EventBus(client, 1000),
        end_patience_s=1.0,
    )
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger=logger):
        reporter.completed(completed_event())
    assert time.monotonic() - started < 1.0 + PROMPT_S
    assert reporter.finished
    assert any(logged in record.getMessage() for record in caplog.records)
    again = restart(url, workdir)
    try:
        record = RunStore(redis.Redis.from_url(url)).get("run-1")
        assert record is not None
        assert record.status == status
        assert sent_events(redis.Redis.from_url(url)) == []
    finally:
        again.stop()


EVALUATION = evaluation_key("run-1")


def queued_evaluation(url: str) -> JobStore:
    """A queued evaluation, its store on a client with no retries of its own (as for the run's end)."""
    jobs = JobStore(one_try_client(url))
    jobs.create(EVALUATION, {"split": "test"}, now=time.time())
    return jobs


def test_a_jobs_end_waits_for_redis_to_come_back(own_redis: tuple[devstack.Service, str, Path]) -> None:
    service, url, workdir = own_redis
    jobs = queued_evaluation(url)
    ends: list[JobEnd] = []

    def evaluate_then_lose_redis(request: dict[str, object]) -> dict[str, object]:
        service.stop()
        return {"loss": 1.5}

    restarted: list[devstack.Service] = []
    later = threading.Timer(OUTAGE_S, lambda: restarted.append(restart(url, workdir)))
    later.start()
    try:
        patience_s = OUTAGE_S + LONGEST_PAUSE_S + PROMPT_S
        status = run_job(jobs, EVALUATION, evaluate_then_lose_redis, ends.append, patience_s)
        record = JobStore(redis.Redis.from_url(url)).get(EVALUATION)
    finally:
        later.join()
        for again in restarted:
            again.stop()
    assert status == "completed"
    assert record is not None
    assert (record.status, record.result) == ("completed", {"loss": 1.5})
    # Its user is told once the record says so.
    assert [end.result for end in ends] == [{"loss": 1.5}]


def test_a_jobs_end_redis_stays_away_from_leaves_it_running_and_tells_nobody(
    own_redis: tuple[devstack.Service, str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    service, url, workdir = own_redis
    jobs = queued_evaluation(url)
    ends: list[JobEnd] = []

    def fail_then_lose_redis(request: dict[str, object]) -> dict[str, object]:
        service.stop()
        raise UserError("the model folder is empty")

    with caplog.at_level(logging.ERROR, logger="trainer_tasks.jobs"):
        assert run_job(jobs, EVALUATION, fail_then_lose_redis, ends.append, 1.0) == "running"
    assert ends == []
    assert "its end not recorded within 1 s (" in caplog.text
    again = restart(url, workdir)
    try:
        record = JobStore(redis.Redis.from_url(url)).get(EVALUATION)
        assert record is not None
        assert record.status == "running"
    finally:
        again.stop()
