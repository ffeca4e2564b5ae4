"""Admitting a training run: within the caps, recorded, then sent; no record waits for a task never sent."""

from __future__ import annotations

import logging
import time
import uuid

import redis
from flask_smorest import abort

from schemas.api import TrainRequest
from trainer_api.services import Services, Task
from trainer_store.runs import (
    NEVER_SENT_MESSAGE,
    UNSENT_GRACE_S,
    InputGone,
    QueueFull,
    TooManyActiveRuns,
)
from trainer_tasks.app import TRAIN_TASK

log = logging.getLogger(__name__)

# What a refused client is told to wait: runs take minutes, so a slot rarely frees sooner.
RETRY_AFTER_S = 60
RETRY_AFTER_DOC: dict[str, object] = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
}
NOT_QUEUED_MESSAGE = "could not queue the run; nothing was trained"
GONE_MESSAGES = {
    "corpus_id": "the corpus was deleted; upload it again",
    "tokenizer_id": 'the tokenizer was deleted; use "auto" or another completed tokenizer',
}


def admit_run(found: Services, request: TrainRequest) -> dict[str, str]:
    """Record a queued run within the caps and send its task; answers its run_id and job_id.

    The record is written first, watched as unsent: if this request dies (or loses Redis or the broker)
    before its task is confirmed sent, the run fails after UNSENT_GRACE_S instead of waiting forever.
    """
    settings = found.settings
    run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    # user_id 0 is nobody in particular (scripts, operators): only Discord users have a cap.
    user_cap = settings.max_active_runs_per_user if request.user_id > 0 else 0
    try:
        found.store.create(
            run_id=run_id,
            job_id=job_id,
            user_id=request.user_id,
            request=request.to_mapping(),
            now=time.time(),
            corpus_id=request.corpus_id,
            tokenizer_id=None if request.tokenizer_id == "auto" else request.tokenizer_id,
            max_active_for_user=user_cap,
            max_queued=settings.max_queued_runs,
            unsent_grace_s=UNSENT_GRACE_S,
            queue=request.queue,
        )
    except TooManyActiveRuns as refused:
        abort(
            429,
            message=(
                f"user {request.user_id} already has {refused.active} runs queued or running; "
                f"at most {refused.cap} are allowed at once; submit again once one has finished"
            ),
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    except QueueFull as refused:
        abort(
            503,
            message=(
                f"the queue is full ({refused.queued} runs waiting, at most {refused.cap}); "
                "try again in a few minutes"
            ),
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    except InputGone as gone:
        abort(422, errors={"json": {gone.field: [GONE_MESSAGES[gone.field]]}})
    send_run(found, run_id, job_id, request.queue)
    return {"run_id": run_id, "job_id": job_id}


def send_run(found: Services, run_id: str, job_id: str, queue: str) -> None:
    """Send the run's task to its queue, then confirm it sent; a run that could not be sent ends failed."""
    try:
        found.dispatch(Task(TRAIN_TASK, [run_id], job_id, queue))
    except Exception:
        fail_unqueued(found, run_id, NOT_QUEUED_MESSAGE)
        raise
    if not found.store.mark_sent(run_id):
        # A worker claimed it already (fine), or it was failed as never sent while this request was
        # stuck sending it: then its task finds it failed and does nothing, and the caller must know.
        record = found.store.get(run_id)
        if record is not None and record.message == NEVER_SENT_MESSAGE:
            abort(503, message="queuing the run took too long; it was not queued, submit it again")


def fail_unqueued(found: Services, run_id: str, message: str) -> None:
    """Best effort: with Redis away too, the unsent watch fails the run later."""
    try:
        found.store.transition(
            run_id,
            ("queued",),
            "failed",
            {"message": message, "error_kind": "system", "finished_at": time.time()},
        )
    except redis.RedisError as exc:
        log.warning("run %s: not queued, and not marked failed yet (%s)", run_id, exc)
