"""The v1 training events: typed records, a compact JSON encoder and a strict decoder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

EVENTS_CHANNEL = "trainer:events"
EVENTS_STREAM = "trainer:events:stream"
# The field of a stream entry that holds the event's JSON, on the global stream and on a run's own.
EVENT_FIELD = "event"

ErrorKind = Literal["user", "system"]
FailedStatus = Literal["failed", "canceled"]
EvalSplit = Literal["validation", "test"]
JsonScalar = str | int | float | bool | None


@dataclass(frozen=True, kw_only=True)
class _Event:
    """Fields every v1 event carries; `event_id`, `seq` and `ts` are optional on the wire."""

    type: ClassVar[str]
    request_id: str
    run_id: str
    user_id: int
    event_id: str | None = None
    seq: int | None = None
    ts: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrainStarted(_Event):
    type: ClassVar[str] = "trainer.train.started.v1"
    model_family: str
    model_size: str
    total_epochs: int
    queue: str
    cpu_cores: int | None = None
    memory_mb: int | None = None
    optimal_threads: int | None = None
    optimal_workers: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    # The Celery hostname of the worker that took the run, what it trains on, and its torch threads.
    worker: str | None = None
    accelerator: str | None = None
    devices: int | None = None
    torch_threads: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrainProgress(_Event):
    type: ClassVar[str] = "trainer.train.progress.v1"
    epoch: int
    total_epochs: int
    step: int
    loss: float
    samples_per_sec: float | None = None
    main_rss_mb: int | None = None
    workers_rss_mb: int | None = None
    worker_count: int | None = None
    cgroup_usage_mb: int | None = None
    cgroup_limit_mb: int | None = None
    cgroup_pct: float | None = None
    tokens_per_sec: float | None = None
    eta_s: float | None = None
    val_loss: float | None = None
    lr: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrainCompleted(_Event):
    type: ClassVar[str] = "trainer.train.completed.v1"
    loss: float
    perplexity: float
    artifact_path: str
    sample: str | None = None
    params: int | None = None
    duration_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrainFailed(_Event):
    type: ClassVar[str] = "trainer.train.failed.v1"
    error_kind: ErrorKind
    message: str
    status: FailedStatus


@dataclass(frozen=True, kw_only=True)
class EvalCompleted(_Event):
    type: ClassVar[str] = "trainer.eval.completed.v1"
    split: EvalSplit
    loss: float
    perplexity: float


@dataclass(frozen=True, kw_only=True)
class EvalFailed(_Event):
    type: ClassVar[str] = "trainer.eval.failed.v1"
    split: EvalSplit
    error_kind: ErrorKind
    message: str


# Every v1 event: a training run's four, and the end of an evaluation of a finished run.
TrainEvent = TrainStarted | TrainProgress | TrainCompleted | TrainFailed | EvalCompleted | EvalFailed


def progress_fraction(event: TrainProgress, started_ts: float | None) -> float:
    """How far a run is: time done over time done plus time left given an ETA; else finished epochs."""
    if event.eta_s is not None and event.ts is not None and started_ts is not None:
        elapsed = max(0.0, event.ts - started_ts)
        total = elapsed + max(0.0, event.eta_s)
        return elapsed / total if total > 0 else 0.0
    return (event.epoch - 1) / event.total_epochs if event.total_epochs > 0 else 0.0


@dataclass(frozen=True)
class NotAnEvent:
    """What the decoder returns for anything that is not a valid v1 event, with the reason."""

    reason: str


def encode_event(event: TrainEvent) -> str:
    """One compact JSON object; optional fields that are unset are left out."""
    body: dict[str, JsonScalar] = {"type": event.type}
    body.update((key, value) for key, value in asdict(event).items() if value is not None)
    return json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def decode_event(raw: str | bytes) -> TrainEvent | NotAnEvent:
    """Parse and check one payload; never raises, so a consumer's loop survives any input."""
    try:
        payload: object = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return NotAnEvent(f"not a v1 event: invalid JSON ({exc})")
    if not isinstance(payload, dict):
        return NotAnEvent("not a v1 event: payload is not a JSON object")
    event_type = payload.get("type")
    build = _BUILDERS.get(event_type) if isinstance(event_type, str) else None
    if build is None:
        return NotAnEvent(f"not a v1 event: unknown or missing type {event_type!r}")
    try:
        # Unknown extra fields are ignored so that newer producers never break this decoder.
        return build(_Fields(payload))
    except _InvalidField as exc:
        return NotAnEvent(f"not a v1 event: {event_type} {exc}")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


class _InvalidField(ValueError):
    pass


class _Fields:
    """Typed reads from a decoded JSON object; a missing or mistyped field raises _InvalidField."""

    def __init__(self, payload: dict[str, object]) -> None:
        self._payload = payload

    def _get(self, name: str, required: bool) -> object:
        if name not in self._payload and required:
            raise _InvalidField(f"lacks field {name!r}")
        return self._payload.get(name)

    def text(self, name: str) -> str:
        value = self._get(name, required=True)
        if not isinstance(value, str):
            raise _InvalidField(f"field {name!r} must be a string")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self._get(name, required=False) is None else self.text(name)

    def integer(self, name: str) -> int:
        value = self._get(name, required=True)
        # bool is an int subclass in Python but never a count on the wire.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _InvalidField(f"field {name!r} must be an integer")
        return value

    def optional_integer(self, name: str) -> int | None:
        return None if self._get(name, required=False) is None else self.integer(name)

    def number(self, name: str) -> float:
        value = self._get(name, required=True)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _InvalidField(f"field {name!r} must be a number")
        return float(value)

    def optional_number(self, name: str) -> float | None:
        return None if self._get(name, required=False) is None else self.number(name)


def _common(f: _Fields) -> tuple[str, str, int, str | None, int | None, float | None]:
    return (
        f.text("request_id"),
        f.text("run_id"),
        f.integer("user_id"),
        f.optional_text("event_id"),
        f.optional_integer("seq"),
        f.optional_number("ts"),
    )


def _started(f: _Fields) -> TrainStarted:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return TrainStarted(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        model_family=f.text("model_family"),
        model_size=f.text("model_size"),
        total_epochs=f.integer("total_epochs"),
        queue=f.text("queue"),
        cpu_cores=f.optional_integer("cpu_cores"),
        memory_mb=f.optional_integer("memory_mb"),
        optimal_threads=f.optional_integer("optimal_threads"),
        optimal_workers=f.optional_integer("optimal_workers"),
        batch_size=f.optional_integer("batch_size"),
        learning_rate=f.optional_number("learning_rate"),
        worker=f.optional_text("worker"),
        accelerator=f.optional_text("accelerator"),
        devices=f.optional_integer("devices"),
        torch_threads=f.optional_integer("torch_threads"),
    )


def _progress(f: _Fields) -> TrainProgress:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return TrainProgress(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        epoch=f.integer("epoch"),
        total_epochs=f.integer("total_epochs"),
        step=f.integer("step"),
        loss=f.number("loss"),
        samples_per_sec=f.optional_number("samples_per_sec"),
        main_rss_mb=f.optional_integer("main_rss_mb"),
        workers_rss_mb=f.optional_integer("workers_rss_mb"),
        worker_count=f.optional_integer("worker_count"),
        cgroup_usage_mb=f.optional_integer("cgroup_usage_mb"),
        cgroup_limit_mb=f.optional_integer("cgroup_limit_mb"),
        cgroup_pct=f.optional_number("cgroup_pct"),
        tokens_per_sec=f.optional_number("tokens_per_sec"),
        eta_s=f.optional_number("eta_s"),
        val_loss=f.optional_number("val_loss"),
        lr=f.optional_number("lr"),
    )


def _completed(f: _Fields) -> TrainCompleted:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return TrainCompleted(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        loss=f.number("loss"),
        perplexity=f.number("perplexity"),
        artifact_path=f.text("artifact_path"),
        sample=f.optional_text("sample"),
        params=f.optional_integer("params"),
        duration_s=f.optional_number("duration_s"),
    )


def _failed(f: _Fields) -> TrainFailed:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return TrainFailed(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        error_kind=_error_kind(f.text("error_kind")),
        message=f.text("message"),
        status=_failed_status(f.text("status")),
    )


def _eval_completed(f: _Fields) -> EvalCompleted:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return EvalCompleted(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        split=_split(f.text("split")),
        loss=f.number("loss"),
        perplexity=f.number("perplexity"),
    )


def _eval_failed(f: _Fields) -> EvalFailed:
    request_id, run_id, user_id, event_id, seq, ts = _common(f)
    return EvalFailed(
        request_id=request_id,
        run_id=run_id,
        user_id=user_id,
        event_id=event_id,
        seq=seq,
        ts=ts,
        split=_split(f.text("split")),
        error_kind=_error_kind(f.text("error_kind")),
        message=f.text("message"),
    )


def _split(value: str) -> EvalSplit:
    if value == "validation":
        return "validation"
    if value == "test":
        return "test"
    raise _InvalidField("field 'split' must be 'validation' or 'test'")


def _error_kind(value: str) -> ErrorKind:
    if value == "user":
        return "user"
    if value == "system":
        return "system"
    raise _InvalidField("field 'error_kind' must be 'user' or 'system'")


def _failed_status(value: str) -> FailedStatus:
    if value == "failed":
        return "failed"
    if value == "canceled":
        return "canceled"
    raise _InvalidField("field 'status' must be 'failed' or 'canceled'")


_BUILDERS: dict[str, Callable[[_Fields], TrainEvent]] = {
    TrainStarted.type: _started,
    TrainProgress.type: _progress,
    TrainCompleted.type: _completed,
    TrainFailed.type: _failed,
    EvalCompleted.type: _eval_completed,
    EvalFailed.type: _eval_failed,
}
