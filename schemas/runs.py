"""The run record in Redis, the source of truth for a run's status, shared by the API and worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis

from schemas.records import compact_json, decoded, json_object, optional_float, text

RunStatus = Literal["queued", "running", "completed", "failed", "canceled"]
RUN_STATUSES: tuple[RunStatus, ...] = ("queued", "running", "completed", "failed", "canceled")
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "canceled"})
ACTIVE_STATUSES: tuple[RunStatus, ...] = ("queued", "running")

# Lifetimes: an active run's keys live as long as the run; a finished run is kept this long.
FINISHED_RUN_TTL_S = 30 * 24 * 3600
USER_INDEX_MAX = 1000

RedisValue = bytes | str | int | float


def run_key(run_id: str) -> str:
    return f"trainer:runs:{run_id}"


def lease_key(run_id: str) -> str:
    """Held by the one worker that trains the run; expires unless the heartbeat renews it."""
    return f"trainer:runs:{run_id}:lease"


def user_runs_key(user_id: int) -> str:
    """A user's run ids scored by creation time: the newest USER_INDEX_MAX, kept as long as a finished run."""
    return f"trainer:users:{user_id}:runs"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    job_id: str
    status: RunStatus
    user_id: int
    created_at: float
    request: dict[str, object]
    message: str = ""
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    last_heartbeat_ts: float | None = None
    progress: dict[str, object] | None = None
    loss: float | None = None
    perplexity: float | None = None
    artifact_path: str | None = None
    error_kind: str | None = None
    cancel_requested: bool = False
    last_seq: int = 0

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


# Moves a run to a new status only from one of the allowed ones, atomically with its other fields.
# KEYS[1] run hash; ARGV: allowed statuses joined by ',', new status, then field/value pairs.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
local allowed = false
for status in string.gmatch(ARGV[1], '[^,]+') do
  if status == current then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Renews the lease only for its holder and records the heartbeat. KEYS: lease, run hash.
# ARGV: holder, lease ms, heartbeat ts.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'last_heartbeat_ts', ARGV[3])
return 1
"""

# Flags an active run for cooperative cancellation; answers the status found. KEYS[1] run hash.
_REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""

# A graceful hand-back: queued again, and the attempt not counted against the run. KEYS[1] run hash.
_HAND_BACK = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'message', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempt', -1)
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RunStore:
    """Reads and moves run records; every status change is a checked transition."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._transition = client.register_script(_TRANSITION)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._hand_back = client.register_script(_HAND_BACK)

    def create(
        self, *, run_id: str, job_id: str, user_id: int, request: dict[str, object], now: float
    ) -> RunRecord:
        record = RunRecord(
            run_id=run_id, job_id=job_id, status="queued", user_id=user_id, created_at=now, request=request
        )
        pipe = self._redis.pipeline()
        pipe.hset(
            run_key(run_id),
            mapping={
                "run_id": run_id,
                "job_id": job_id,
                "status": "queued",
                "user_id": user_id,
                "created_at": now,
                "request": compact_json(request),
                "message": "queued",
                "attempt": 0,
            },
        )
        pipe.zadd(user_runs_key(user_id), {run_id: now})
        pipe.zremrangebyrank(user_runs_key(user_id), 0, -USER_INDEX_MAX - 1)
        pipe.expire(user_runs_key(user_id), FINISHED_RUN_TTL_S)
        pipe.execute()
        return record

    def get(self, run_id: str) -> RunRecord | None:
        return _parse_record(decoded(self._redis.hgetall(run_key(run_id))))

    def claim(self, run_id: str, holder: str, lease_s: float, now: float) -> bool:
        """Take the run's lease and mark it running; False when another executor holds it or it ended."""
        if not self._redis.set(lease_key(run_id), holder, px=int(lease_s * 1000), nx=True):
            return False
        moved = self.transition(
            run_id,
            ACTIVE_STATUSES,
            "running",
            {"started_at": now, "last_heartbeat_ts": now, "message": "running", "worker": holder},
        )
        if not moved:
            self.release(run_id, holder)
            return False
        self._redis.hincrby(run_key(run_id), "attempt", 1)
        return True

    def hand_back(self, run_id: str, message: str) -> bool:
        """Queue a running run again after a graceful shutdown; that attempt does not count."""
        return bool(self._hand_back(keys=[run_key(run_id)], args=[message]) == 1)

    def renew(self, run_id: str, holder: str, lease_s: float, now: float) -> bool:
        """Extend the lease and write the heartbeat; False when the lease was lost."""
        result = self._renew(
            keys=[lease_key(run_id), run_key(run_id)], args=[holder, int(lease_s * 1000), now]
        )
        return bool(result == 1)

    def list_for_user(self, user_id: int, limit: int) -> list[RunRecord]:
        """The user's newest runs first; ids whose record has expired are dropped from the index."""
        index = user_runs_key(user_id)
        found: list[RunRecord] = []
        expired: list[str] = []
        for raw_id in self._redis.zrevrange(index, 0, limit - 1):
            # Without withscores each item is a member, bytes or str by the client's decoding.
            run_id = text(raw_id)
            record = self.get(run_id)
            if record is None:
                expired.append(run_id)
            else:
                found.append(record)
        if expired:
            self._redis.zrem(index, *expired)
        return found

    def release(self, run_id: str, holder: str) -> None:
        self._release(keys=[lease_key(run_id)], args=[holder])

    def transition(
        self,
        run_id: str,
        allowed_from: tuple[RunStatus, ...],
        status: RunStatus,
        fields: dict[str, RedisValue] | None = None,
    ) -> bool:
        args: list[RedisValue] = [",".join(allowed_from), status]
        for name, value in (fields or {}).items():
            args.extend((name, value))
        moved = bool(self._transition(keys=[run_key(run_id)], args=args) == 1)
        if moved and status in TERMINAL_STATUSES:
            self._redis.expire(run_key(run_id), FINISHED_RUN_TTL_S)
        return moved

    def finish(self, run_id: str, status: RunStatus, message: str, now: float, **metrics: RedisValue) -> bool:
        """Record the end of a running run; False when it was not running (already ended elsewhere)."""
        return self.transition(
            run_id, ("running",), status, {"message": message, "finished_at": now, **metrics}
        )

    def request_cancel(self, run_id: str) -> RunStatus | None:
        """Ask an active run to stop; answers the status it had (None for an unknown run).

        The worker that trains the run sees the flag at its next heartbeat and stops; a queued run
        ends canceled as soon as a worker picks it up. A finished run is left as it is.
        """
        found = self._request_cancel(keys=[run_key(run_id)])
        if not isinstance(found, (bytes, str)):
            return None
        return _status(text(found))

    def cancel_requested(self, run_id: str) -> bool:
        return self._redis.hget(run_key(run_id), "cancel_requested") in (b"1", "1")

    def save_progress(self, run_id: str, progress: dict[str, object]) -> None:
        self._redis.hset(run_key(run_id), "progress", compact_json(progress))

    def ping(self) -> bool:
        return bool(self._redis.ping())


def _status(value: str) -> RunStatus:
    for status in RUN_STATUSES:
        if status == value:
            return status
    raise ValueError(f"unknown run status {value!r}")


def _parse_record(raw: dict[str, str]) -> RunRecord | None:
    if "run_id" not in raw or "status" not in raw:
        return None  # a fragment, not a record: treat the run as unknown
    return RunRecord(
        run_id=raw["run_id"],
        job_id=raw.get("job_id", ""),
        status=_status(raw["status"]),
        user_id=int(raw["user_id"]),
        created_at=float(raw["created_at"]),
        request=json_object(raw, "request") or {},
        message=raw.get("message", ""),
        attempt=int(raw.get("attempt", "0")),
        started_at=optional_float(raw, "started_at"),
        finished_at=optional_float(raw, "finished_at"),
        last_heartbeat_ts=optional_float(raw, "last_heartbeat_ts"),
        progress=json_object(raw, "progress"),
        loss=optional_float(raw, "loss"),
        perplexity=optional_float(raw, "perplexity"),
        artifact_path=raw.get("artifact_path") or None,
        error_kind=raw.get("error_kind") or None,
        cancel_requested=raw.get("cancel_requested") == "1",
        last_seq=int(raw.get("last_seq", "0")),
    )
