"""Finds running runs whose worker died (their lease expired) and sends each back to its queue."""

from __future__ import annotations

import logging
from collections.abc import Callable

from trainer_store.runs import RunStore

log = logging.getLogger(__name__)

RESUMED_MESSAGE = "queued again: its worker stopped answering; it resumes from its last checkpoint"
Requeue = Callable[[str, str, float], None]  # run id, its queue, delay in seconds


def resume_abandoned_runs(store: RunStore, requeue: Requeue) -> list[str]:
    """Answers the runs sent back. The task is sent before the run is moved: a send that fails leaves the
    run running with its lease expired, for the next pass; a task that arrives first claims the run itself.
    Several workers may do this at once: one moves the run, and one delivery claims it."""
    resumed: list[str] = []
    for run_id in store.expired_leases():
        record = store.get(run_id)
        if record is None or record.status != "running" or store.lease_held(run_id):
            store.resume_abandoned(run_id, RESUMED_MESSAGE)  # only puts the index right
            continue
        requeue(run_id, record.queue, 0)
        if store.resume_abandoned(run_id, RESUMED_MESSAGE):
            log.warning("run %s: its worker stopped answering; sent back to queue %s", run_id, record.queue)
            resumed.append(run_id)
    return resumed
