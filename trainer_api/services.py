"""What the views use, built once per app: settings, the run store and the task dispatcher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from flask import current_app

from schemas.runs import RunStore
from schemas.settings import Settings
from trainer_tasks.app import TRAIN_TASK, celery_app

EXTENSION = "trainer"
Dispatch = Callable[[str, str], None]


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    store: RunStore
    dispatch: Dispatch


def send_train_task(run_id: str, job_id: str) -> None:
    """Send by name: the API never imports the training code."""
    celery_app.send_task(TRAIN_TASK, args=[run_id], task_id=job_id)


def build(settings: Settings, dispatch: Dispatch = send_train_task) -> Services:
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
    )
    return Services(settings=settings, redis=client, store=RunStore(client), dispatch=dispatch)


def services() -> Services:
    found = current_app.extensions[EXTENSION]
    if not isinstance(found, Services):
        raise TypeError("the app was not built by create_app()")
    return found
