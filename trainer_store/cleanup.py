"""A run's files leave the store with it: working files once its record expires, everything on delete."""

from __future__ import annotations

import logging

import redis

from trainer_store.layout import FileStores, model_folder, run_folder
from trainer_store.records import text
from trainer_store.runs import EXPIRING_RUNS, run_key, run_log_key

log = logging.getLogger(__name__)

SWEEP_BATCH = 100


def remove_working_files(files: FileStores, client: redis.Redis, run_id: str) -> None:
    """The run's checkpoints and data splits, and its log lines; its artifacts stay."""
    files.runs.remove(run_folder(run_id))
    client.delete(run_log_key(run_id))


def remove_run_files(files: FileStores, client: redis.Redis, run_id: str) -> None:
    """Everything a run left in the store and its log lines: for deleting the run itself."""
    remove_working_files(files, client, run_id)
    files.artifacts.remove(model_folder(run_id))
    client.zrem(EXPIRING_RUNS, run_id)


def sweep_expired_runs(
    files: FileStores, client: redis.Redis, now: float, batch: int = SWEEP_BATCH
) -> list[str]:
    """Remove the working files of runs whose record has expired; answers their ids.

    A run due in the index whose record is still there (its lifetime was extended) is looked at again
    when that record would expire; one whose record lost its expiry is active again and leaves the
    index until it finishes anew.
    """
    swept: list[str] = []
    for member in client.zrangebyscore(EXPIRING_RUNS, "-inf", now, start=0, num=batch):
        run_id = text(member)
        ttl_ms = client.pttl(run_key(run_id))
        if isinstance(ttl_ms, int) and ttl_ms >= 0:
            client.zadd(EXPIRING_RUNS, {run_id: now + ttl_ms / 1000})
            continue
        if ttl_ms == -2:  # no record: it expired
            remove_working_files(files, client, run_id)
            swept.append(run_id)
        client.zrem(EXPIRING_RUNS, run_id)
    if swept:
        log.info("removed the working files of %d expired runs", len(swept))
    return swept
