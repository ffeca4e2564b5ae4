"""Executes one delivery of a run: claim it, keep its heartbeat, train, and record how it ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from schemas.api import TrainRequest
from trainer_store.cache import FileCache
from trainer_store.jobs import JobStore
from trainer_store.layout import FileStores
from trainer_store.runlog import RunLogWriter
from trainer_store.runs import RunRecord, RunStore
from trainer_store.settings import Settings
from trainer_tasks import resources
from trainer_tasks.errors import LeaseLost, RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.heartbeat import Heartbeat
from trainer_tasks.reporting import CANCELED_BEFORE_TRAINING, RunReporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the training code is given: where files live, how to report and log, when to stop."""

    run_id: str
    request: TrainRequest
    reporter: RunReporter
    files: FileStores
    cache: FileCache
    log_lines: Callable[[str], None]  # each line the run logs, for its stream in Redis; never blocks
    queue: str
    worker: str  # the Celery hostname of the worker training it
    torch_threads: int  # this worker's share of its machine's cores
    progress_interval_s: float
    cancel_requested: Callable[[], bool]
    lease_lost: Callable[[], bool]
    settings: Settings  # what a process of its own (a DDP rank) builds its clients from
    # `last.ckpt` is also saved this often within an epoch.
    checkpoint_interval_s: float = 300.0
    # True once the run has trained `max_run_s`, this attempt and the earlier ones together.
    over_time_limit: Callable[[], bool] = lambda: False
    max_run_s: float = 24 * 3600.0


TrainFn = Callable[[RunContext], None]
Requeue = Callable[[str, str, float], None]  # run id, its queue, delay in seconds
# Deliveries that claim a run; more means its worker keeps dying on it (a crash loop, say).
MAX_ATTEMPTS = 5


def load_training() -> TrainFn:
    """Imported on first use: torch and Lightning load in the worker's pool process only."""
    from trainer_tasks.training import train

    return train


@dataclass(frozen=True)
class Worker:
    """One pool process's view of the services a run needs."""

    settings: Settings
    redis: redis.Redis
    store: RunStore
    jobs: JobStore
    bus: EventBus
    files: FileStores
    cache: FileCache
    holder: str
    requeue: Requeue
    train: Callable[[], TrainFn] = load_training
    name: str = ""  # the Celery hostname, set per task; the holder stands in when unset
    # Torch threads a run may use: the worker's share of the machine (trainer_tasks.registry).
    torch_threads: Callable[[], int] = resources.available_cpus


def execute_run(run_id: str, worker: Worker) -> str:
    """Train the run unless it has ended or is in hand elsewhere; answers how this delivery ended."""
    record = worker.store.get(run_id)
    if record is None:
        log.error("run %s: no record; nothing to train", run_id)
        return "missing"
    if record.is_terminal:
        log.info("run %s: already %s; this delivery does nothing", run_id, record.status)
        return record.status
    if not worker.store.claim(run_id, worker.holder, worker.settings.lease_s, time.time(), worker.name):
        # A live executor has it (this is a redelivery), or a dead one whose lease has not expired yet:
        # the periodic check sends that run back once it has. This delivery is done.
        log.info("run %s: another executor holds it; this delivery does nothing", run_id)
        return "held-elsewhere"
    reporter = _reporter_for(record, worker)
    try:
        # As claimed: this attempt counted, and a dead attempt's time added to train_s. A running run's
        # record has no expiry and cannot be deleted, so it is there.
        return _train_claimed(worker.store.get(run_id) or record, reporter, worker)
    finally:
        worker.store.release(run_id, worker.holder)


def _reporter_for(record: RunRecord, worker: Worker) -> RunReporter:
    """The run's reporter on this worker: its events numbered on from the record's last one."""
    return RunReporter(
        run_id=record.run_id,
        user_id=record.user_id,
        holder=worker.holder,
        store=worker.store,
        bus=worker.bus,
        last_seq=record.last_seq,
    )


def end_canceled_queued_run(run_id: str, worker: Worker) -> str:
    """End a queued run its user canceled, at once; a run a worker took meanwhile sees the flag there."""
    record = worker.store.get(run_id)
    if record is None:
        return "missing"
    reporter = _reporter_for(record, worker)
    return "canceled" if reporter.canceled_while_queued() else record.status


def _train_claimed(record: RunRecord, reporter: RunReporter, worker: Worker) -> str:
    run_id = reporter.run_id
    attempt = record.attempt
    if worker.store.cancel_requested(run_id):
        reporter.failed("user", CANCELED_BEFORE_TRAINING, canceled=True)
        return "canceled"
    if attempt > MAX_ATTEMPTS:
        reporter.failed("system", f"the run lost its worker {MAX_ATTEMPTS} times; it is not tried again")
        return "failed"
    heartbeat = Heartbeat(
        worker.store,
        run_id,
        worker.holder,
        interval_s=worker.settings.heartbeat_interval_s,
        lease_s=worker.settings.lease_s,
    )
    log_writer = RunLogWriter(worker.redis, run_id, worker.settings.log_stream_maxlen)
    try:
        with heartbeat:
            request = TrainRequest.from_mapping(record.request)
            worker.train()(_context(record, request, reporter, heartbeat, log_writer, worker))
    except SystemExit:
        # A shutdown (Lightning turns SIGTERM into SystemExit): hand the run back, it resumes elsewhere.
        log.warning("run %s: worker shutting down; the run goes back to the queue", run_id)
        worker.store.hand_back(run_id, "requeued after a worker shutdown")
        worker.requeue(run_id, record.queue, 0)
        return "requeued"
    except LeaseLost:
        # Another executor may have taken the run over, or nobody has (Redis was away for a while): the
        # periodic check sends a run nobody holds back to its queue.
        log.warning("run %s: lease lost; stopped without reporting", run_id)
        return "lease-lost"
    except (UserError, RunCanceled) as exc:
        log.info("run %s ended early: %s", run_id, exc or type(exc).__name__)
        reporter.failed_with(exc)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        reporter.failed_with(exc)
    finally:
        log_writer.close()
    if not reporter.finished:
        reporter.failed("system", "training ended without reporting a result")
    final = worker.store.get(run_id)
    return final.status if final else "missing"


def _context(
    record: RunRecord,
    request: TrainRequest,
    reporter: RunReporter,
    heartbeat: Heartbeat,
    log_writer: RunLogWriter,
    worker: Worker,
) -> RunContext:
    settings = worker.settings
    # Measured from the claim, as the record's train_s is.
    deadline = time.monotonic() + settings.max_run_s - record.train_s
    return RunContext(
        run_id=record.run_id,
        request=request,
        reporter=reporter,
        files=worker.files,
        cache=worker.cache,
        log_lines=log_writer.write,
        queue=request.queue,
        worker=worker.name or worker.holder,
        torch_threads=worker.torch_threads(),
        progress_interval_s=worker.settings.progress_interval_s,
        cancel_requested=heartbeat.cancel_requested.is_set,
        lease_lost=heartbeat.lease_lost.is_set,
        settings=worker.settings,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        over_time_limit=lambda: time.monotonic() >= deadline,
        max_run_s=settings.max_run_s,
    )
