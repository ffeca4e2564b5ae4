"""Celery tasks: thin wrappers that hand the run id to the runner."""

from __future__ import annotations

import functools
import os
import socket
import uuid

import redis

from celeryconfig import TRAINING_QUEUE
from schemas.runs import RunStore
from schemas.settings import Settings
from trainer_tasks.app import TRAIN_TASK, celery_app
from trainer_tasks.events import EventBus
from trainer_tasks.runner import Worker, execute_run


def requeue(run_id: str) -> None:
    celery_app.send_task(TRAIN_TASK, args=[run_id])


@functools.cache
def worker_services() -> Worker:
    """Built once per pool process, after the fork, so no Redis connection is shared across processes."""
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    store = RunStore(client)
    return Worker(
        settings=settings,
        store=store,
        bus=EventBus(client, settings.events_stream_maxlen),
        holder=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        queue=TRAINING_QUEUE,
        requeue=requeue,
    )


@celery_app.task(name=TRAIN_TASK)
def train(run_id: str) -> str:
    """Train one run; a second delivery of the same run returns without training."""
    return execute_run(run_id, worker_services())
