"""What the views use, built once per app: settings, the stores and the task dispatcher."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from flask import current_app
from flask_smorest import abort

from schemas.corpora import CorpusStore
from schemas.jobs import JobStore
from schemas.runs import RunRecord, RunStore
from schemas.settings import Settings
from trainer_tasks.app import celery_app

EXTENSION = "trainer"
# (task name, arguments, task id): the API names tasks and never imports the code that runs them.
Dispatch = Callable[[str, list[str], str], None]


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    store: RunStore
    dispatch: Dispatch
    corpora: CorpusStore
    jobs: JobStore


def send_task(name: str, args: list[str], task_id: str) -> None:
    """Send by name; celeryconfig's task_routes pick the queue."""
    celery_app.send_task(name, args=args, task_id=task_id)


def build(settings: Settings, dispatch: Dispatch = send_task) -> Services:
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
    )
    return Services(
        settings=settings,
        redis=client,
        store=RunStore(client),
        dispatch=dispatch,
        corpora=CorpusStore(client),
        jobs=JobStore(client),
    )


def dispatch_job(found: Services, key: str, task: str, args: list[str], job_id: str) -> None:
    """Queue a short job whose record is at `key`; a dispatch that fails marks it failed, then raises."""
    try:
        found.dispatch(task, args, job_id)
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
