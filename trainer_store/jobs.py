"""Short jobs beside training (tokenizer training, evaluation): a status record each, in Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from schemas.status import JOB_STATUSES, JobStatus
from trainer_store.records import compact_json, decoded, json_object, optional_float

# A finished job's record is kept as long as a finished run's.
FINISHED_JOB_TTL_S = 30 * 24 * 3600


def tokenizer_key(tokenizer_id: str) -> str:
    return f"trainer:tokenizers:{tokenizer_id}"


def evaluation_key(run_id: str) -> str:
    """The latest evaluation of a run."""
    return f"trainer:runs:{run_id}:eval"


@dataclass(frozen=True)
class JobRecord:
    status: JobStatus
    request: dict[str, object]
    created_at: float
    message: str = ""
    finished_at: float | None = None
    result: dict[str, object] | None = None


class JobStore:
    """Records keyed by the caller (a tokenizer's key, a run's evaluation key)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def create(self, key: str, request: dict[str, object], now: float) -> None:
        pipe = self._redis.pipeline()
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "status": "queued",
                "request": compact_json(request),
                "created_at": now,
                "message": "queued",
            },
        )
        pipe.execute()

    def get(self, key: str) -> JobRecord | None:
        raw = decoded(self._redis.hgetall(key))
        if not raw:
            return None
        return JobRecord(
            status=_job_status(raw["status"]),
            request=json_object(raw, "request") or {},
            created_at=float(raw["created_at"]),
            message=raw.get("message", ""),
            finished_at=optional_float(raw, "finished_at"),
            result=json_object(raw, "result"),
        )

    def start(self, key: str) -> None:
        self._redis.hset(key, mapping={"status": "running", "message": "running"})

    def complete(self, key: str, result: dict[str, object], now: float) -> None:
        self._finish(
            key, {"status": "completed", "message": "completed", "result": compact_json(result)}, now
        )

    def fail(self, key: str, message: str, now: float) -> None:
        self._finish(key, {"status": "failed", "message": message}, now)

    def delete(self, key: str) -> None:
        self._redis.delete(key)

    def _finish(self, key: str, fields: dict[FieldT, EncodableT], now: float) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.hset(key, "finished_at", now)
        pipe.expire(key, FINISHED_JOB_TTL_S)
        pipe.execute()


def _job_status(value: str) -> JobStatus:
    for status in JOB_STATUSES:
        if status == value:
            return status
    raise ValueError(f"unknown job status {value!r}")
