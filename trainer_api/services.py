"""What the views use, built once per app: settings, the stores and the task dispatcher."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import redis
from flask import current_app
from flask_smorest import abort
from kombu import Producer
from kombu.exceptions import KombuError, OperationalError
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from schemas.queues import NEW_TASK_PRIORITY
from trainer_store.corpora import CorpusStore
from trainer_store.jobs import JobStore
from trainer_store.layout import FileStores
from trainer_store.runs import RunRecord, RunStore
from trainer_store.settings import Settings
from trainer_store.storage import Storage
from trainer_store.workers import LiveQueues, WorkerRegistry
from trainer_tasks.app import celery_app

EXTENSION = "trainer"
# With Redis away a request answers 503 within a few seconds: a refused connection fails at once, a
# silent one after the connect timeout, each of the 1 + REDIS_RETRIES tries.
REDIS_CONNECT_TIMEOUT_S = 1.0
REDIS_TIMEOUT_S = 5.0
REDIS_RETRIES = 2
# A follower of a stream holds a connection for each blocking read, so a process needs about as many
# connections as it has threads; gunicorn's threads are the bound. redis-py's default pool refuses past
# 100, which would answer 503 to everyone in a process following more than about 100 streams.
REDIS_MAX_CONNECTIONS = 4096


@dataclass(frozen=True)
class Task:
    """A Celery task sent by name: the API never imports the code that runs it."""

    name: str
    args: list[str]
    task_id: str
    # None: celeryconfig's task_routes pick the queue; a run names its own.
    queue: str | None = None
    # New work waits behind runs that go back to their queue (schemas.queues).
    priority: int = NEW_TASK_PRIORITY


Dispatch = Callable[[Task], None]


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    store: RunStore
    dispatch: Dispatch
    corpora: CorpusStore
    jobs: JobStore
    workers: WorkerRegistry
    live_queues: LiveQueues
    # Where files live: uploaded and operator corpora, trained models and tokenizers, run working files.
    corpus_files: Storage
    artifact_files: Storage
    run_files: Storage

    @property
    def files(self) -> FileStores:
        return FileStores(self.corpus_files, self.artifact_files, self.run_files)


class TaskSender(Protocol):
    """What the API needs of a Celery app."""

    def send_task(
        self,
        name: str,
        *,
        args: list[str],
        task_id: str,
        ignore_result: bool,
        queue: str | None,
        priority: int,
        producer: Producer,
    ) -> object: ...

    def producer_or_acquire(self) -> AbstractContextManager[Producer]: ...


@runtime_checkable
class Batching(Protocol):
    """kombu's producer (5.7 on; its stubs do not know it yet): what it publishes inside `batch()` goes
    to Redis in one pipeline."""

    def batch(self) -> AbstractContextManager[object]: ...


def sender(app: TaskSender) -> Dispatch:
    """Send tasks by name through `app`, to the task's queue or the one celeryconfig's task_routes pick."""

    def send(task: Task) -> None:
        with app.producer_or_acquire() as producer:
            assert isinstance(producer, Batching)  # kombu>=5.7, as setup.cfg requires
            try:
                # The task and its task-sent event (for Flower) in one round trip, not two.
                with producer.batch():
                    # Nobody reads Celery's results (the run record is the truth). Asking for one
                    # subscribes this process to the result channel, which keeps every subscription
                    # and, with Redis away, retries for 20 s and then breaks until a restart: a send
                    # must only publish.
                    app.send_task(
                        task.name,
                        args=task.args,
                        task_id=task.task_id,
                        ignore_result=True,
                        queue=task.queue,
                        priority=task.priority,
                        producer=producer,
                    )
            except KombuError as failed:
                # kombu's BatchPublishError (its stubs do not know it yet): the batch may or may not
                # have arrived. Callers fail the run; a task that did arrive finds it ended and stops.
                raise OperationalError(f"the task was not confirmed sent: {failed}") from failed

    return send


send_task = sender(celery_app)


def build(settings: Settings, dispatch: Dispatch = send_task) -> Services:
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
        max_connections=REDIS_MAX_CONNECTIONS,
        # redis-py retries 10 times by default, for up to ~10 s: a request waits at most ~3 s instead.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), REDIS_RETRIES),
    )
    files = FileStores.from_settings(settings)
    workers = WorkerRegistry(client)
    return Services(
        settings=settings,
        redis=client,
        store=RunStore(client),
        dispatch=dispatch,
        corpora=CorpusStore(client),
        jobs=JobStore(client),
        workers=workers,
        live_queues=LiveQueues(workers),
        corpus_files=files.corpora,
        artifact_files=files.artifacts,
        run_files=files.runs,
    )


def dispatch_job(found: Services, key: str, task: str, args: list[str], job_id: str) -> None:
    """Queue a short job whose record is at `key`; a dispatch that fails marks it failed, then raises."""
    try:
        found.dispatch(Task(task, args, job_id))
    except Exception:
        found.jobs.fail(key, "could not queue the job; nothing was done", time.time())
        raise


def run_or_404(run_id: str) -> RunRecord:
    """The run's record; a 404 in the error envelope for an unknown run."""
    record = services().store.get(run_id)
    if record is None:
        abort(404, message=f"no run {run_id!r}")
    assert record is not None  # abort raises; flask-smorest's untyped abort hides that from mypy
    return record


def services() -> Services:
    found = current_app.extensions[EXTENSION]
    if not isinstance(found, Services):
        raise TypeError("the app was not built by create_app()")
    return found
