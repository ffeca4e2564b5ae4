"""Executes a short job (tokenizer training, evaluation) against its record: start, work, record the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.events import ErrorKind
from trainer_store.jobs import JobStore
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


def run_job(store: JobStore, key: str, work: Work, ended: Callable[[JobEnd], None] = _ignore) -> str:
    """Run `work` on the job's request unless the job is unknown or has ended; answers its final status.

    `ended` hears how the job ended, once its record says so (an evaluation tells its user).
    """
    record = store.get(key)
    if record is None:
        log.error("job %s: no record; nothing to do", key)
        return "missing"
    if record.status in ("completed", "failed"):
        log.info("job %s: already %s; this delivery does nothing", key, record.status)
        return record.status
    store.start(key)
    try:
        result = work(record.request)
    except UserError as exc:
        store.fail(key, str(exc), time.time())
        ended(JobEnd(record.request, message=str(exc), error_kind="user"))
        return "failed"
    except StoreUnavailable as exc:
        log.warning("job %s: %s", key, exc)
        store.fail(key, f"the job could not use {exc.store}: {exc.reason}", time.time())
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", key)
        message = f"the worker hit an internal error ({type(exc).__name__}); see the worker log"
        store.fail(key, message, time.time())
        ended(JobEnd(record.request, message=message, error_kind="system"))
        return "failed"
    store.complete(key, result, time.time())
    ended(JobEnd(record.request, result=result))
    return "completed"
