"""Executes one delivery of a run: claim it, keep its heartbeat, train, and record how it ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.api import TrainRequest
from schemas.jobs import JobStore
from schemas.runs import RunStore
from schemas.settings import Settings
from trainer_tasks.errors import LeaseLost, RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.heartbeat import Heartbeat
from trainer_tasks.reporting import RunReporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the training code is given: where to write, how to report, when to stop."""

    run_id: str
    request: TrainRequest
    reporter: RunReporter
    run_dir: Path
    artifact_dir: Path
    log_path: Path  # what the worker logs during the run, read by GET /runs/{run_id}/logs
    queue: str
    progress_interval_s: float
    cancel_requested: Callable[[], bool]
    lease_lost: Callable[[], bool]
    tokenizer_path: Path | None = None  # a trained tokenizer's tokenizer.json; None trains one on the corpus


TrainFn = Callable[[RunContext], None]
Requeue = Callable[[str, float], None]  # run id, delay in seconds
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
    store: RunStore
    jobs: JobStore
    bus: EventBus
    holder: str
    queue: str
    requeue: Requeue
    train: Callable[[], TrainFn] = load_training


def execute_run(run_id: str, worker: Worker) -> str:
    """Train the run unless it has ended or is in hand elsewhere; answers how this delivery ended."""
    record = worker.store.get(run_id)
    if record is None:
        log.error("run %s: no record; nothing to train", run_id)
        return "missing"
    if record.is_terminal:
        log.info("run %s: already %s; this delivery does nothing", run_id, record.status)
        return record.status
    if not worker.store.claim(run_id, worker.holder, worker.settings.lease_s, time.time()):
        # A live executor, or a dead one whose lease has not expired yet: look again once it would have.
        log.info(
            "run %s: another executor holds it; checking again in %.0f s", run_id, worker.settings.lease_s
        )
        worker.requeue(run_id, worker.settings.lease_s)
        return "deferred"
    reporter = RunReporter(
        run_id=run_id, user_id=record.user_id, store=worker.store, bus=worker.bus, last_seq=record.last_seq
    )
    try:
        return _train_claimed(record.request, record.attempt + 1, reporter, worker)
    finally:
        worker.store.release(run_id, worker.holder)


def _train_claimed(
    request_fields: dict[str, object], attempt: int, reporter: RunReporter, worker: Worker
) -> str:
    run_id = reporter.run_id
    if worker.store.cancel_requested(run_id):
        reporter.failed("user", "canceled at the user's request before training started", canceled=True)
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
    try:
        with heartbeat:
            worker.train()(
                _context(run_id, TrainRequest.from_mapping(request_fields), reporter, heartbeat, worker)
            )
    except SystemExit:
        # A shutdown (Lightning turns SIGTERM into SystemExit): hand the run back, it resumes elsewhere.
        log.warning("run %s: worker shutting down; the run goes back to the queue", run_id)
        worker.store.hand_back(run_id, "requeued after a worker shutdown")
        worker.requeue(run_id, 0)
        return "requeued"
    except LeaseLost:
        # Another executor may have taken the run over, or nobody has (Redis was away for a while):
        # a delivery after the lease time finds out, and resumes the run if nobody holds it.
        log.warning("run %s: lease lost; checking again in %.0f s", run_id, worker.settings.lease_s)
        worker.requeue(run_id, worker.settings.lease_s)
        return "lease-lost"
    except (UserError, RunCanceled) as exc:
        log.info("run %s ended early: %s", run_id, exc or type(exc).__name__)
        reporter.failed_with(exc)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        reporter.failed_with(exc)
    if not reporter.finished:
        reporter.failed("system", "training ended without reporting a result")
    final = worker.store.get(run_id)
    return final.status if final else "missing"


def _context(
    run_id: str, request: TrainRequest, reporter: RunReporter, heartbeat: Heartbeat, worker: Worker
) -> RunContext:
    return RunContext(
        run_id=run_id,
        request=request,
        reporter=reporter,
        run_dir=worker.settings.run_dir(run_id),
        artifact_dir=worker.settings.model_dir(run_id),
        log_path=worker.settings.run_log(run_id),
        queue=worker.queue,
        progress_interval_s=worker.settings.progress_interval_s,
        cancel_requested=heartbeat.cancel_requested.is_set,
        lease_lost=heartbeat.lease_lost.is_set,
        tokenizer_path=(
            None
            if request.tokenizer_id == "auto"
            else worker.settings.tokenizer_dir(request.tokenizer_id) / "tokenizer.json"
        ),
    )
