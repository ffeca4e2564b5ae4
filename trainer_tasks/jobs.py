"""Executes a short job (tokenizer training, evaluation) against its record: start, work, record the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from schemas.jobs import JobStore
from trainer_tasks.errors import UserError

log = logging.getLogger(__name__)

Work = Callable[[dict[str, object]], dict[str, object]]


def run_job(store: JobStore, key: str, work: Work) -> str:
    """Run `work` on the job's request unless the job is unknown or has ended; answers its final status."""
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
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", key)
        store.fail(
            key, f"the worker hit an internal error ({type(exc).__name__}); see the worker log", time.time()
        )
        return "failed"
    store.complete(key, result, time.time())
    return "completed"
