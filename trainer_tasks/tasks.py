"""Celery tasks: thin wrappers that hand the run id to the runner."""

from __future__ import annotations

import functools
import os
import socket
import uuid

import redis

from celeryconfig import TRAINING_QUEUE
from schemas.jobs import JobStore, evaluation_key, tokenizer_key
from schemas.runs import RunStore
from schemas.settings import Settings
from trainer_tasks.app import EVALUATE_TASK, TOKENIZER_TASK, TRAIN_TASK, celery_app
from trainer_tasks.events import EventBus
from trainer_tasks.jobs import run_job
from trainer_tasks.runner import Worker, execute_run
from trainer_tasks.tokenization import train_from_request


def requeue(run_id: str, delay_s: float) -> None:
    celery_app.send_task(TRAIN_TASK, args=[run_id], countdown=delay_s or None)


@functools.cache
def worker_services() -> Worker:
    """Built once per pool process, after the fork, so no Redis connection is shared across processes."""
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    store = RunStore(client)
    return Worker(
        settings=settings,
        store=store,
        jobs=JobStore(client),
        bus=EventBus(client, settings.events_stream_maxlen),
        holder=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        queue=TRAINING_QUEUE,
        requeue=requeue,
    )


@celery_app.task(name=TRAIN_TASK)
def train(run_id: str) -> str:
    """Train one run; a second delivery of the same run returns without training."""
    return execute_run(run_id, worker_services())


# A tokenizer or evaluation that kills its process (memory) would do it again: no redelivery for them.
@celery_app.task(name=TOKENIZER_TASK, reject_on_worker_lost=False)
def train_tokenizer(tokenizer_id: str) -> str:
    """Train a BPE tokenizer on a corpus and measure it on the corpus's held-out tail."""
    folder = worker_services().settings.tokenizer_dir(tokenizer_id)
    return run_job(
        worker_services().jobs,
        tokenizer_key(tokenizer_id),
        lambda request: train_from_request(request, folder),
    )


@celery_app.task(name=EVALUATE_TASK, reject_on_worker_lost=False)
def evaluate(run_id: str, split: str) -> str:
    """Evaluate a finished run's model on its validation or test split."""
    settings = worker_services().settings

    def work(request: dict[str, object]) -> dict[str, object]:
        from trainer_tasks.evaluation import evaluate as evaluate_split  # torch loads only when needed

        # The record says which evaluation is current: a stale redelivery must not write another split.
        recorded = request.get("split", split)
        return evaluate_split(settings.model_dir(run_id), settings.run_dir(run_id) / "splits", str(recorded))

    return run_job(worker_services().jobs, evaluation_key(run_id), work)
