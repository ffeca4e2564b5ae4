"""Executes a short job (tokenizer training, evaluation) against its record: start, work, record the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from schemas.events import ErrorKind
from trainer_store.jobs import JobStore
from trainer_store.outages import END_PATIENCE_S, REDIS_AWAY, patiently
from trainer_store.storage import StoreUnavailable
from trainer_tasks.errors import UserError

log = logging.getLogger(__name__)

Work = Callable[[dict[str, object]], dict[str, object]]


@dataclass(frozen=True)
class JobEnd:
    """How a job this delivery ran has ended: its result, or why it failed and whose it is to fix."""

    request: dict[str, object]
    result: dict[str, object] | None = None
    message: str = ""
    error_kind: ErrorKind | None = None


def _ignore(_: JobEnd) -> None:
    return None


def run_job(
    store: JobStore,
    key: str,
    work: Work,
    ended: Callable[[JobEnd], None] = _ignore,
    end_patience_s: float = END_PATIENCE_S,
) -> str:
    """Run `work` on the job's request unless the job is unknown or has ended; answers its final status.

    The end is recorded waiting out a Redis that is away, as a run's is; `ended` hears how the job ended
    once its record says so (an evaluation tells its user). A job whose end Redis did not take within the
    patience stays running.
    """
    record = store.get(key)
    if record is None:
        log.error("job %s: no record; nothing to do", key)
        return "missing"
    if record.status in ("completed", "failed"):
        log.info("job %s: already %s; this delivery does nothing", key, record.status)
        return record.status
    store.start(key)
    end = _outcome(key, work, record.request)
    now = time.time()

    def record_end() -> None:
        if end.result is not None:
            store.complete(key, end.result, now)
        else:
            store.fail(key, end.message, now)

    def unrecorded(exc: redis.RedisError) -> None:
        log.warning("job %s: its end not recorded yet: %s", key, exc)

    try:
        patiently(record_end, end_patience_s, unrecorded)
    except REDIS_AWAY as exc:
        log.error("job %s: its end not recorded within %g s (%s); it stays running", key, end_patience_s, exc)
        return "running"
    ended(end)
    return "completed" if end.result is not None else "failed"


def _outcome(key: str, work: Work, request: dict[str, object]) -> JobEnd:
    """What the work came to: its result, or why it failed and whose it is to fix."""
    try:
        return JobEnd(request, result=work(request))
    except UserError as exc:
        return JobEnd(request, message=str(exc), error_kind="user")
    except StoreUnavailable as exc:
        log.warning("job %s: %s", key, exc)
        return JobEnd(
            request, message=f"the job could not use {exc.store}: {exc.reason}", error_kind="system"
        )
    except Exception as exc:
        log.exception("job %s failed", key)
        message = f"the worker hit an internal error ({type(exc).__name__}); see the worker log"
        return JobEnd(request, message=message, error_kind="system")
