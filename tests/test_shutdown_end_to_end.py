"""A worker stopped by its platform (SIGTERM) hands its run back, and another worker resumes it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch
from celery import Celery

from schemas.api import TrainRequest
from schemas.events import TrainProgress
from scripts import corpus, devstack
from tests.conftest import Stack
from tests.streams import sent_events
from trainer_store.runs import RunRecord, RunStore
from trainer_tasks.app import TRAIN_TASK


def wait_for(
    store: RunStore, run_id: str, condition: Callable[[RunRecord], bool], timeout_s: float = 120
) -> RunRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = store.get(run_id)
        if record is not None and condition(record):
            return record
        time.sleep(0.1)
    raise AssertionError(f"run {run_id}: condition not met in {timeout_s:.0f} s; record {store.get(run_id)}")


def step(record: RunRecord) -> int:
    progress = record.progress or {}
    found = progress.get("step", 0)
    return found if isinstance(found, int) else 0


def test_sigterm_to_the_worker_requeues_the_run_and_the_next_worker_resumes_it(
    stack: Stack, tmp_path: Path
) -> None:
    # Its own database and workers: the session's training worker must not take this run.
    url = stack.redis_url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RunStore(client)
    env = {
        **devstack.stack_env(url, tmp_path, corpora=tmp_path, base=stack.env),
        "WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "2",
    }
    request = TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=32,
        num_epochs=20,
        batch_size=8,
        learning_rate=1e-3,
        corpus_path=corpus.write(tmp_path / "stories.txt", 3000, seed=5).name,
        tokenizer_id="auto",
        user_id=7,
        seed=1,
    )
    store.create(run_id="long-run", job_id="job", user_id=7, request=request.to_mapping(), now=time.time())
    first = devstack.start_worker(env, tmp_path / "logs", name="first")
    Celery(broker=url).send_task(TRAIN_TASK, args=["long-run"], queue="training")
    wait_for(store, "long-run", lambda record: step(record) >= 40)

    os.kill(first.process.pid, signal.SIGTERM)  # the Celery master only, as a platform stops a process
    assert first.process.wait(60) == 0
    requeued = store.get("long-run")
    assert requeued is not None
    assert (requeued.status, requeued.message, requeued.attempt) == (
        "queued",
        "requeued after a worker shutdown",
        0,
    )
    checkpoint: object = torch.load(
        tmp_path / "runs" / "long-run" / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert isinstance(checkpoint, dict)
    saved_step = checkpoint["global_step"]
    assert saved_step >= 40

    second = devstack.start_worker(env, tmp_path / "logs", name="second")
    try:
        resumed = wait_for(store, "long-run", lambda record: record.last_seq > requeued.last_seq + 1)
        assert resumed.attempt == 1
        # Resumed from the checkpoint: the first progress of the new attempt is past the saved step
        # (training from scratch would report a handful of steps at the first 0.2 s progress).
        new_progress = [
            event
            for event in sent_events(client)
            if isinstance(event, TrainProgress) and (event.seq or 0) > requeued.last_seq
        ]
        assert new_progress[0].step > saved_step
        assert store.request_cancel("long-run") == "running"
        ended = wait_for(store, "long-run", lambda record: record.is_terminal)
        assert ended.status == "canceled"
    finally:
        second.stop()
        client.flushdb()
