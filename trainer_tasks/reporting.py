"""A run's reporter: stamps its events, writes the run record first, then sends the event."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis

from schemas.events import ErrorKind, FailedStatus, TrainCompleted, TrainFailed, TrainProgress, TrainStarted
from schemas.status import RunStatus
from trainer_store.outages import END_PATIENCE_S, REDIS_AWAY, patiently
from trainer_store.runs import RedisValue, RunStore
from trainer_store.storage import StoreUnavailable
from trainer_tasks.errors import RunCanceled, UserError
from trainer_tasks.events import EventBus

log = logging.getLogger(__name__)
CANCELED_BEFORE_TRAINING = "canceled at the user's request before training started"
E = TypeVar("E", TrainStarted, TrainProgress, TrainCompleted, TrainFailed)


class RunReporter:
    """The one path from a run to its record and its events; sends at most one terminal event."""

    def __init__(
        self,
        *,
        run_id: str,
        user_id: int,
        holder: str,
        store: RunStore,
        bus: EventBus,
        last_seq: int = 0,
        clock: Callable[[], float] = time.time,
        end_patience_s: float = END_PATIENCE_S,
    ) -> None:
        self.run_id = run_id
        self.user_id = user_id
        # The executor whose lease this attempt holds: once another has taken the run over, its end is theirs.
        self.holder = holder
        self._store = store
        self._bus = bus
        self._seq = last_seq
        self._clock = clock
        self._end_patience_s = end_patience_s
        self.finished = False

    def _stamp(self, event: E) -> E:
        self._seq += 1
        return dataclasses.replace(event, event_id=uuid.uuid4().hex, seq=self._seq, ts=self._clock())

    def started(self, event: TrainStarted) -> None:
        self._bus.send(self._stamp(event))

    def progress(self, event: TrainProgress) -> None:
        stamped = self._stamp(event)
        try:
            self._store.save_progress(self.run_id, _progress_summary(stamped))
        except redis.RedisError as exc:
            log.warning("progress of run %s not recorded: %s", self.run_id, exc)
        self._bus.send(stamped)

    def completed(self, event: TrainCompleted) -> None:
        if self.finished:
            return
        # The record first: a client that reacts to the event then reads the final status.
        recorded = self._finish(
            "completed",
            "completed",
            loss=event.loss,
            perplexity=event.perplexity,
            artifact_path=event.artifact_path,
        )
        self.finished = True
        if recorded:
            self._bus.deliver(self._stamp(event), self._end_patience_s)

    def failed(self, error_kind: ErrorKind, message: str, canceled: bool = False) -> None:
        if self.finished:
            return
        status: FailedStatus = "canceled" if canceled else "failed"
        recorded = self._finish(status, message, error_kind=error_kind)
        self.finished = True
        if not recorded:
            # The run had already ended (or another executor took it), or its end could not be recorded:
            # its story is told elsewhere, or by the attempt that takes it up again.
            return
        self._tell_failed(status, error_kind, message)

    def _finish(self, status: RunStatus, message: str, **fields: RedisValue) -> bool:
        """Record the run's end, waiting out a Redis that is away; False when the run had ended or been
        taken over elsewhere, or when Redis stayed away past the patience: then the run stays running, its
        lease is released or expires once this attempt is over, and the periodic check sends it back to
        resume from its last checkpoint."""
        now = self._clock()

        def record_end() -> bool:
            if self._store.finish(self.run_id, status, message, now, holder=self.holder, **fields):
                return True
            # A try whose answer was lost may have recorded this end already: the end at this very time.
            record = self._store.get(self.run_id)
            return record is not None and (record.status, record.finished_at) == (status, now)

        try:
            return patiently(record_end, self._end_patience_s, self._log_unrecorded)
        except REDIS_AWAY as exc:
            log.error(
                "run %s: its end (%s) not recorded within %g s (%s); taken up again once its lease expires",
                self.run_id,
                status,
                self._end_patience_s,
                exc,
            )
            return False

    def _log_unrecorded(self, exc: redis.RedisError) -> None:
        log.warning("run %s: its end not recorded yet: %s", self.run_id, exc)

    def canceled_while_queued(self) -> bool:
        """End a run its user canceled before any worker took it; False when one has (it sees the flag)."""
        now = self._clock()
        fields: dict[str, RedisValue] = {
            "message": CANCELED_BEFORE_TRAINING,
            "error_kind": "user",
            "finished_at": now,
        }
        if not self._store.transition(self.run_id, ("queued",), "canceled", fields, now=now):
            return False
        self.finished = True
        self._tell_failed("canceled", "user", CANCELED_BEFORE_TRAINING)
        return True

    def _tell_failed(self, status: FailedStatus, error_kind: ErrorKind, message: str) -> None:
        event = TrainFailed(
            request_id=self.run_id,
            run_id=self.run_id,
            user_id=self.user_id,
            error_kind=error_kind,
            message=message,
            status=status,
        )
        self._bus.deliver(self._stamp(event), self._end_patience_s)

    def failed_with(self, exc: BaseException) -> None:
        """Say why a run ended early: the user's to fix, a cancel, a store that failed, or ours (details
        stay in the log)."""
        if isinstance(exc, RunCanceled):
            self.failed("user", "canceled at the user's request", canceled=True)
        elif isinstance(exc, UserError):
            self.failed("user", str(exc))
        elif isinstance(exc, StoreUnavailable):
            # Operators need to know which store: its root and endpoint (never a credential).
            self.failed("system", f"the run could not use {exc.store}: {exc.reason}")
        else:
            self.failed(
                "system",
                f"the worker hit an internal error ({type(exc).__name__}); "
                f"operators find the details in the worker log under run {self.run_id}",
            )


def _progress_summary(event: TrainProgress) -> dict[str, object]:
    summary: dict[str, object] = {
        "epoch": event.epoch,
        "total_epochs": event.total_epochs,
        "step": event.step,
        "loss": event.loss,
        "ts": event.ts,
    }
    for name in ("samples_per_sec", "tokens_per_sec"):
        value = getattr(event, name)
        if value is not None:
            summary[name] = value
    return summary
