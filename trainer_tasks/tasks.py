"""Celery tasks: thin wrappers that hand the run id to the runner."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
import uuid

import redis

from schemas.events import EvalCompleted, EvalFailed, EvalSplit
from schemas.queues import RESUMED_PRIORITY
from trainer_store.cache import FileCache
from trainer_store.jobs import JobStore, evaluation_key, tokenizer_key
from trainer_store.layout import FileStores
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_store.workers import WorkerRegistry
from trainer_tasks.app import CANCEL_QUEUED_TASK, EVALUATE_TASK, TOKENIZER_TASK, TRAIN_TASK, celery_app
from trainer_tasks.events import EventBus
from trainer_tasks.jobs import JobEnd, run_job
from trainer_tasks.registry import threads_of
from trainer_tasks.runner import Worker, end_canceled_queued_run, execute_run
from trainer_tasks.tokenization import train_from_request


def requeue(run_id: str, queue: str, delay_s: float) -> None:
    """Send a run that had started back to its queue, ahead of the runs that never did."""
    celery_app.send_task(
        TRAIN_TASK,
        args=[run_id],
        queue=queue,
        priority=RESUMED_PRIORITY,
        countdown=delay_s or None,
        ignore_result=True,
    )


@functools.cache
def worker_services() -> Worker:
    """Built once per pool process, after the fork, so no Redis connection is shared across processes."""
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    store = RunStore(client)
    return Worker(
        settings=settings,
        redis=client,
        store=store,
        jobs=JobStore(client),
        bus=EventBus(client, settings.events_stream_maxlen),
        files=FileStores.from_settings(settings),
        cache=FileCache(settings.cache_root, settings.cache_max_bytes),
        holder=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        requeue=requeue,
    )


@celery_app.task(name=TRAIN_TASK)
def train(run_id: str) -> str:
    """Train one run; a second delivery of the same run returns without training."""
    hostname = train.request.hostname
    worker = worker_services()
    if isinstance(hostname, str):
        registry = WorkerRegistry(worker.redis)
        worker = dataclasses.replace(
            worker, name=hostname, torch_threads=lambda: threads_of(registry, hostname, time.time())
        )
    return execute_run(run_id, worker)


# A tokenizer or evaluation that kills its process (memory) would do it again: no redelivery for them.
@celery_app.task(name=CANCEL_QUEUED_TASK, reject_on_worker_lost=False)
def cancel_queued(run_id: str) -> str:
    """End a run canceled while it waited in its queue, rather than when a training worker takes it."""
    return end_canceled_queued_run(run_id, worker_services())


@celery_app.task(name=TOKENIZER_TASK, reject_on_worker_lost=False)
def train_tokenizer(tokenizer_id: str) -> str:
    """Train a BPE tokenizer on a corpus and measure it on the corpus's held-out tail."""
    worker = worker_services()
    return run_job(
        worker.jobs,
        tokenizer_key(tokenizer_id),
        lambda request: train_from_request(request, worker.files, worker.cache, tokenizer_id),
    )


@celery_app.task(name=EVALUATE_TASK, reject_on_worker_lost=False)
def evaluate(run_id: str, split: str) -> str:
    """Evaluate a finished run's model on its validation or test split."""
    worker = worker_services()

    def work(request: dict[str, object]) -> dict[str, object]:
        from trainer_tasks.evaluation import evaluate as evaluate_split  # torch loads only when needed

        # The record says which evaluation is current: a stale redelivery must not write another split.
        recorded = request.get("split", split)
        return evaluate_split(worker.files, worker.cache, run_id, str(recorded))

    return run_job(worker.jobs, evaluation_key(run_id), work, lambda end: tell_evaluated(run_id, end))


def tell_evaluated(run_id: str, end: JobEnd) -> None:
    """Publish how an evaluation ended, for the run's owner, numbered after the run's own events."""
    services = worker_services()
    record = services.store.get(run_id)
    if record is None:
        return  # the run expired meanwhile: there is nobody left to tell
    split: EvalSplit = "test" if end.request.get("split") == "test" else "validation"
    event: EvalCompleted | EvalFailed
    if end.result is not None:
        loss, perplexity = _number(end.result, "loss"), _number(end.result, "perplexity")
        event = EvalCompleted(
            request_id=run_id,
            run_id=run_id,
            user_id=record.user_id,
            split=split,
            loss=loss,
            perplexity=perplexity,
        )
    else:
        kind = end.error_kind or "system"
        event = EvalFailed(
            request_id=run_id,
            run_id=run_id,
            user_id=record.user_id,
            split=split,
            error_kind=kind,
            message=end.message,
        )
    services.bus.deliver(
        dataclasses.replace(event, event_id=uuid.uuid4().hex, seq=record.last_seq + 1, ts=time.time())
    )


def _number(result: dict[str, object], name: str) -> float:
    value = result.get(name)
    if not isinstance(value, (int, float)):
        raise TypeError(f"the evaluation's {name} is not a number")
    return float(value)
