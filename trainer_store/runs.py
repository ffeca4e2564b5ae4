"""The run record in Redis, the source of truth for a run's status, shared by the API and worker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

from schemas.queues import TRAINING_QUEUE
from schemas.status import RUN_STATUSES, TERMINAL_STATUSES, RunStatus
from trainer_store.corpora import corpus_key
from trainer_store.jobs import evaluation_key, tokenizer_key
from trainer_store.records import compact_json, decoded, is_record_id, json_object, optional_float, text

# Lifetimes: an active run's keys live as long as the run; a finished run is kept this long.
FINISHED_RUN_TTL_S = 30 * 24 * 3600
USER_INDEX_MAX = 1000
# A day of progress at one event every 2 s, with room for the others: a run's whole history.
RUN_EVENTS_MAXLEN = 50_000
# A run whose task was neither confirmed sent (mark_sent) nor claimed this long after its record was
# written fails: the request that wrote it died, or lost Redis or the broker, before sending it, so no
# task would ever pick it up. Far longer than a request may take (gunicorn's timeout is 30 s).
UNSENT_GRACE_S = 60.0
NEVER_SENT_MESSAGE = (
    "the run was never queued: the API lost Redis or the broker before sending its task; "
    "nothing was trained, submit it again"
)
# Status -> runs in it: exact for queued and running; for the final statuses, runs that have reached
# them (a counter: neither expiry nor DELETE takes a run off it).
RUN_STATS_KEY = "trainer:stats:runs"
# Run keys whose task is not yet known to be sent, scored by the Redis clock time they fail at.
UNSENT_RUNS_KEY = "trainer:dispatch:unsent"
# Finished runs scored by when their record expires (Unix seconds); no expiry of its own: the workers'
# sweep (trainer_store.cleanup) removes each run's working files once its record is gone, then its entry.
EXPIRING_RUNS = "trainer:expiry:runs"
# Running runs scored by when their lease expires (Redis clock, Unix seconds): written when a run is
# claimed and at each heartbeat, removed when it leaves `running`. The periodic check reads the expired
# end to find runs whose worker died, without scanning keys.
RUNNING_LEASES_KEY = "trainer:leases:running"

# Each queue's queued runs, in the order workers take them: runs handed back or found abandoned first
# (scored by when, less RESUMED_AHEAD_S), then runs that never started (by creation time).
RESUMED_AHEAD_S = 1e10

RedisValue = bytes | str | int | float


def run_key(run_id: str) -> str:
    return f"trainer:runs:{run_id}"


def lease_key(run_id: str) -> str:
    """Held by the one worker that trains the run; expires unless the heartbeat renews it."""
    return f"trainer:runs:{run_id}:lease"


def user_runs_key(user_id: int) -> str:
    """A user's run ids scored by creation time: the newest USER_INDEX_MAX, kept as long as a finished run."""
    return f"trainer:users:{user_id}:runs"


def user_active_key(user_id: int) -> str:
    """The user's queued and running runs (the per-user cap counts them); gone when there are none."""
    return f"trainer:users:{user_id}:active"


def corpus_runs_key(corpus_id: str) -> str:
    """The queued and running runs that train on an uploaded corpus: it cannot be deleted under them."""
    return f"trainer:corpora:{corpus_id}:runs"


def tokenizer_runs_key(tokenizer_id: str) -> str:
    """The queued and running runs that use a trained tokenizer."""
    return f"trainer:tokenizers:{tokenizer_id}:runs"


def queue_waiting_key(queue: str) -> str:
    """A queue's queued runs in the order they will be taken (the Lua scripts build the same name)."""
    return f"trainer:queues:{queue}:waiting"


def run_log_key(run_id: str) -> str:
    """The run's log lines, a capped stream."""
    return f"trainer:runs:{run_id}:log"


def run_events_key(run_id: str) -> str:
    """The run's own events, a capped stream of the newest RUN_EVENTS_MAXLEN (a run's whole history)."""
    return f"trainer:runs:{run_id}:events"


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
    # Wall-clock seconds trained by the attempts that have ended; the current one began at attempt_started_at.
    train_s: float = 0.0
    attempt_started_at: float | None = None
    # The Celery queue the run is sent to, again whenever it goes back to the queue.
    queue: str = TRAINING_QUEUE
    # The Celery hostname of the worker that took the run last; None until one does.
    worker: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class RunRefused(Exception):
    """The run was not created; nothing was written."""


class TooManyActiveRuns(RunRefused):
    def __init__(self, active: int, cap: int) -> None:
        super().__init__(f"{active} runs queued or running; the cap is {cap}")
        self.active = active
        self.cap = cap


class QueueFull(RunRefused):
    def __init__(self, queued: int, cap: int) -> None:
        super().__init__(f"{queued} runs queued; the cap is {cap}")
        self.queued = queued
        self.cap = cap


class InputGone(RunRefused):
    """The corpus or tokenizer the run names was deleted (or is being deleted), or is not completed."""

    def __init__(self, field: str) -> None:
        super().__init__(f"the {field} is gone")
        self.field = field


@dataclass(frozen=True)
class Retirement:
    """What marking a corpus or tokenizer for deletion found: `retired` lets the delete go on."""

    outcome: Literal["retired", "missing", "busy", "in-use"]
    active_runs: int = 0
    status: str = ""


# The bookkeeping of every status change, shared by the scripts below. KEYS[2] the counts by status,
# KEYS[3] the unsent runs. A record written before the counts existed has no `active_sets` field and
# is left out of them, so they never go negative. Lua numbers become integers when passed to Redis:
# fractions travel as formatted strings.
_MOVE = f"""
local RESUMED_AHEAD_S = {RESUMED_AHEAD_S:.0f}
local RUNNING_LEASES = '{RUNNING_LEASES_KEY}'
local EXPIRING_RUNS = '{EXPIRING_RUNS}'

local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function waiting_key(run)
  return 'trainer:queues:' .. (redis.call('HGET', run, 'queue') or 'training') .. ':waiting'
end

local function move(run, to, now, finished_ttl)
  local from = redis.call('HGET', run, 'status')
  redis.call('HSET', run, 'status', to)
  if from == to then return end
  if from == 'queued' then redis.call('ZREM', waiting_key(run), redis.call('HGET', run, 'run_id')) end
  if to == 'queued' then
    -- Only a run that had started comes back to the queue: ahead of those that never did.
    redis.call('ZADD', waiting_key(run), string.format('%.6f', now - RESUMED_AHEAD_S),
      redis.call('HGET', run, 'run_id'))
  end
  if redis.call('HEXISTS', run, 'active_sets') == 1 then
    redis.call('HINCRBY', KEYS[2], from, -1)
    redis.call('HINCRBY', KEYS[2], to, 1)
  end
  if from == 'queued' then redis.call('ZREM', KEYS[3], run) end
  if from == 'running' then
    redis.call('ZREM', RUNNING_LEASES, redis.call('HGET', run, 'run_id'))
    local started = tonumber(redis.call('HGET', run, 'attempt_started_at') or '')
    if started then
      redis.call('HINCRBYFLOAT', run, 'train_s', string.format('%.3f', math.max(0, now - started)))
      redis.call('HDEL', run, 'attempt_started_at')
    end
  end
  if to ~= 'queued' and to ~= 'running' then
    local id = redis.call('HGET', run, 'run_id')
    for set in string.gmatch(redis.call('HGET', run, 'active_sets') or '', '%S+') do
      redis.call('SREM', set, id)
    end
    redis.call('EXPIRE', run, finished_ttl)
    redis.call('ZADD', EXPIRING_RUNS, string.format('%.6f', redis_now() + tonumber(finished_ttl)), id)
  end
end

-- Fails the runs whose task was never confirmed sent in time (oldest first, a bounded batch).
local function fail_unsent(finished_ttl, message)
  local now = redis_now()
  local late = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.6f', now), 'LIMIT', 0, 100)
  for _, run in ipairs(late) do
    if redis.call('HGET', run, 'status') == 'queued' then
      move(run, 'failed', now, finished_ttl)
      redis.call('HSET', run, 'message', message, 'error_kind', 'system',
        'finished_at', string.format('%.6f', now))
    end
    redis.call('ZREM', KEYS[3], run)
  end
  return #late
end
"""

# Writes a new queued run unless a cap is reached or an input it names has gone, in one step with
# the counts and indexes. KEYS: run hash, counts, unsent, the user's index, the user's active runs,
# then a (record, active runs) pair for each input the run uses (its corpus, its tokenizer).
# ARGV: run id, creation time, user cap, queue cap (0: none), unsent grace s (0: not watched),
# finished TTL, never-sent message, user index size, then the record's field/value pairs.
_CREATE = (
    _MOVE
    + """
fail_unsent(ARGV[6], ARGV[7])
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local user_cap = tonumber(ARGV[3])
local active = redis.call('SCARD', KEYS[5])
if user_cap > 0 and active >= user_cap then return {'user-cap', active} end
local queue_cap = tonumber(ARGV[4])
local queued = tonumber(redis.call('HGET', KEYS[2], 'queued') or '0')
if queue_cap > 0 and queued >= queue_cap then return {'queue-full', queued} end
local sets = {KEYS[5]}
for i = 6, #KEYS, 2 do
  local status = redis.call('HGET', KEYS[i], 'status')
  if redis.call('EXISTS', KEYS[i]) == 0 or redis.call('HGET', KEYS[i], 'retired') == '1'
      or (status and status ~= 'completed') then
    return {'gone', tostring((i - 4) / 2)}
  end
  table.insert(sets, KEYS[i + 1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('HSET', KEYS[1], 'active_sets', table.concat(sets, ' '))
redis.call('ZADD', waiting_key(KEYS[1]), ARGV[2], ARGV[1])
for _, set in ipairs(sets) do redis.call('SADD', set, ARGV[1]) end
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[8]) - 1)
redis.call('EXPIRE', KEYS[4], ARGV[6])
local grace = tonumber(ARGV[5])
if grace > 0 then redis.call('ZADD', KEYS[3], string.format('%.6f', redis_now() + grace), KEYS[1]) end
return {'created'}
"""
)

# KEYS: counts, unsent (KEYS[1] unused, kept so the shared functions read the same layout).
# ARGV: finished TTL, never-sent message.
_FAIL_UNSENT = _MOVE + "return fail_unsent(ARGV[1], ARGV[2])"

# Moves a run to a new status only from one of the allowed ones, atomically with its other fields; with
# a holder, not while another executor holds the run's lease.
# KEYS: run hash, counts, unsent, lease. ARGV: allowed statuses joined by ',', new status, now, finished
# TTL, holder ('' for none), then field/value pairs.
_TRANSITION = (
    _MOVE
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
local allowed = false
for status in string.gmatch(ARGV[1], '[^,]+') do
  if status == current then allowed = true end
end
if not allowed then return 0 end
if ARGV[5] ~= '' then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= ARGV[5] then return 0 end
end
move(KEYS[1], ARGV[2], tonumber(ARGV[3]), ARGV[4])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
)

# Takes the lease of an active run and marks it running, a new attempt. A run found running lost its
# executor (the lease expired): that attempt trained until its last heartbeat.
# KEYS: run hash, counts, unsent, lease. ARGV: holder, lease ms, now, finished TTL, worker name.
_CLAIM = (
    _MOVE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
if not redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
if status == 'running' then
  local started = tonumber(redis.call('HGET', KEYS[1], 'attempt_started_at') or '')
  local beat = tonumber(redis.call('HGET', KEYS[1], 'last_heartbeat_ts') or '')
  if started and beat then
    redis.call('HINCRBYFLOAT', KEYS[1], 'train_s', string.format('%.3f', math.max(0, beat - started)))
  end
else
  move(KEYS[1], 'running', tonumber(ARGV[3]), ARGV[4])
end
redis.call('HSET', KEYS[1], 'started_at', ARGV[3], 'last_heartbeat_ts', ARGV[3], 'message', 'running',
  'worker', ARGV[5], 'attempt_started_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('ZREM', KEYS[3], KEYS[1])
redis.call('ZADD', RUNNING_LEASES, string.format('%.6f', redis_now() + tonumber(ARGV[2]) / 1000),
  redis.call('HGET', KEYS[1], 'run_id'))
return 1
"""
)

# A graceful hand-back: queued again, and the attempt not counted against the run.
# KEYS: run hash, counts, unsent. ARGV: message, now, finished TTL.
_HAND_BACK = (
    _MOVE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
move(KEYS[1], 'queued', tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[1], 'message', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempt', -1)
return 1
"""
)

# Renews the lease only for its holder and records the heartbeat; a running run's entry in the index
# of leases moves to the new expiry. KEYS: lease, run hash, index of leases. ARGV: holder, lease ms,
# heartbeat ts.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'last_heartbeat_ts', ARGV[3])
if redis.call('HGET', KEYS[2], 'status') == 'running' then
  local t = redis.call('TIME')
  local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2]) / 1000
  redis.call('ZADD', KEYS[3], string.format('%.6f', expiry), redis.call('HGET', KEYS[2], 'run_id'))
end
return 1
"""

# Sends a running run whose lease has expired back to its queue, ahead of runs that never started; the
# attempt it lost counts, and trained until its last heartbeat. Only one caller moves it: the status and
# the absent lease are checked in the same step. A run found ended, or with a live lease, is only put
# right in the index. KEYS: run hash, counts, unsent, lease, index of leases. ARGV: run id, message,
# finished TTL.
_RESUME_ABANDONED = (
    _MOVE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 0
end
local now = redis_now()
local left_ms = redis.call('PTTL', KEYS[4])
if left_ms ~= -2 then
  if left_ms >= 0 then redis.call('ZADD', KEYS[5], string.format('%.6f', now + left_ms / 1000), ARGV[1]) end
  return 0
end
local started = tonumber(redis.call('HGET', KEYS[1], 'attempt_started_at') or '')
local beat = tonumber(redis.call('HGET', KEYS[1], 'last_heartbeat_ts') or '')
if started and beat then
  redis.call('HINCRBYFLOAT', KEYS[1], 'train_s', string.format('%.3f', math.max(0, beat - started)))
end
redis.call('HDEL', KEYS[1], 'attempt_started_at')
move(KEYS[1], 'queued', now, ARGV[3])
redis.call('HSET', KEYS[1], 'message', ARGV[2])
return 1
"""
)

# Enters a running run that is missing from the lease index (left running by a version without the index),
# due at once: the next check for dead workers resumes it unless a live lease holds it. KEYS[1] run hash,
# KEYS[2] the index. ARGV: run id. Answers 1 when it was entered.
_INDEX_UNLEASED = (
    _MOVE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], string.format('%.6f', redis_now()), ARGV[1])
return 1
"""
)

# Flags an active run for cooperative cancellation; answers the status found. KEYS[1] run hash.
_REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Removes a finished run's keys; answers 'deleted', 'missing', or the active status that stopped it.
# KEYS: run hash, the user's index, then the run's other keys. ARGV: run id.
_DELETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'running' then return status end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 'deleted'
"""

# Marks a corpus or tokenizer record as going away unless a queued or running run uses it (or, for a
# tokenizer, it is still being trained): from then on no new run may name it. KEYS: record, its runs.
_RETIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then return {'busy', '0', status} end
local users = redis.call('SCARD', KEYS[2])
if users > 0 then return {'in-use', tostring(users)} end
redis.call('HSET', KEYS[1], 'retired', '1')
return {'retired'}
"""


class RunStore:
    """Reads and moves run records; every status change is a checked transition that keeps the counts."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._create = client.register_script(_CREATE)
        self._fail_unsent = client.register_script(_FAIL_UNSENT)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._hand_back = client.register_script(_HAND_BACK)
        self._resume_abandoned = client.register_script(_RESUME_ABANDONED)
        self._index_unleased = client.register_script(_INDEX_UNLEASED)
        self._delete = client.register_script(_DELETE)
        self._retire = client.register_script(_RETIRE)

    def _moving_keys(self, run_id: str) -> list[str]:
        return [run_key(run_id), RUN_STATS_KEY, UNSENT_RUNS_KEY]

    def create(
        self,
        *,
        run_id: str,
        job_id: str,
        user_id: int,
        request: dict[str, object],
        now: float,
        corpus_id: str | None = None,
        tokenizer_id: str | None = None,
        max_active_for_user: int = 0,
        max_queued: int = 0,
        unsent_grace_s: float = 0.0,
        queue: str = TRAINING_QUEUE,
    ) -> RunRecord:
        """Write a queued run, or raise RunRefused having written nothing.

        The caps (0: none) are checked in the same step as the write, so concurrent requests cannot
        overshoot them. With `unsent_grace_s`, the run fails unless `mark_sent` or a claim follows in time.
        """
        inputs: list[tuple[str, str, str]] = []
        if corpus_id is not None:
            inputs.append(("corpus_id", corpus_key(corpus_id), corpus_runs_key(corpus_id)))
        if tokenizer_id is not None:
            inputs.append(("tokenizer_id", tokenizer_key(tokenizer_id), tokenizer_runs_key(tokenizer_id)))
        record = RunRecord(
            run_id=run_id,
            job_id=job_id,
            status="queued",
            user_id=user_id,
            created_at=now,
            request=request,
            queue=queue,
        )
        fields: dict[str, RedisValue] = {
            "run_id": run_id,
            "job_id": job_id,
            "status": "queued",
            "user_id": user_id,
            "created_at": now,
            "request": compact_json(request),
            "message": "queued",
            "attempt": 0,
            "queue": queue,
        }
        keys = [*self._moving_keys(run_id), user_runs_key(user_id), user_active_key(user_id)]
        for _, record_key, runs_key in inputs:
            keys.extend((record_key, runs_key))
        args: list[RedisValue] = [
            run_id,
            now,
            max_active_for_user,
            max_queued,
            unsent_grace_s,
            FINISHED_RUN_TTL_S,
            NEVER_SENT_MESSAGE,
            USER_INDEX_MAX,
        ]
        for name, value in fields.items():
            args.extend((name, value))
        answer = self._create(keys=keys, args=args)
        outcome, detail = _outcome(answer)
        if outcome == "user-cap":
            raise TooManyActiveRuns(int(detail), max_active_for_user)
        if outcome == "queue-full":
            raise QueueFull(int(detail), max_queued)
        if outcome == "gone":
            raise InputGone(inputs[int(detail) - 1][0])
        if outcome != "created":
            raise RunRefused(f"run {run_id!r} exists already")
        return record

    def mark_sent(self, run_id: str) -> bool:
        """The run's task is in the broker: it is no longer failed as never sent. False when it already was
        (or never was watched)."""
        return bool(self._redis.zrem(UNSENT_RUNS_KEY, run_key(run_id)))

    def fail_unsent(self) -> int:
        """Fail the runs whose task was not confirmed sent in time; answers how many were looked at."""
        result = self._fail_unsent(
            keys=[UNSENT_RUNS_KEY, RUN_STATS_KEY, UNSENT_RUNS_KEY],
            args=[FINISHED_RUN_TTL_S, NEVER_SENT_MESSAGE],
        )
        return int(result)

    def counts(self) -> dict[str, int]:
        """Runs by status (`trainer:stats:runs`): exact for queued and running, totals for the final ones."""
        raw = decoded(self._redis.hgetall(RUN_STATS_KEY))
        return {status: int(raw.get(status, "0")) for status in RUN_STATUSES}

    def queue_position(self, record: RunRecord) -> int | None:
        """Where a queued run stands in its queue, 1 for the next one taken; None unless it is queued."""
        if record.status != "queued":
            return None
        rank = self._redis.zrank(queue_waiting_key(record.queue), record.run_id)
        return rank + 1 if isinstance(rank, int) else None

    def active_for_user(self, user_id: int) -> int:
        return int(self._redis.scard(user_active_key(user_id)))

    def get(self, run_id: str) -> RunRecord | None:
        if not is_record_id(run_id):
            return None
        return _parse_record(decoded(self._redis.hgetall(run_key(run_id))))

    def claim(self, run_id: str, holder: str, lease_s: float, now: float, worker: str = "") -> bool:
        """Take the run's lease and mark it running; False when another executor holds it or it ended.

        `worker` (the Celery hostname) is recorded as who took it; the holder when not given."""
        result = self._claim(
            keys=[*self._moving_keys(run_id), lease_key(run_id)],
            args=[holder, int(lease_s * 1000), now, FINISHED_RUN_TTL_S, worker or holder],
        )
        return bool(result == 1)

    def hand_back(self, run_id: str, message: str, now: float | None = None) -> bool:
        """Queue a running run again after a graceful shutdown; that attempt does not count."""
        clock = time.time() if now is None else now
        result = self._hand_back(keys=self._moving_keys(run_id), args=[message, clock, FINISHED_RUN_TTL_S])
        return bool(result == 1)

    def renew(self, run_id: str, holder: str, lease_s: float, now: float) -> bool:
        """Extend the lease and write the heartbeat; False when the lease was lost."""
        result = self._renew(
            keys=[lease_key(run_id), run_key(run_id), RUNNING_LEASES_KEY],
            args=[holder, int(lease_s * 1000), now],
        )
        return bool(result == 1)

    def redis_now(self) -> float:
        """Redis's clock, which the lease and expiry indexes are scored by: workers' clocks may drift."""
        seconds, micros = self._redis.time()
        return seconds + micros / 1e6

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Running runs whose lease expired by the Redis clock, longest expired first: their worker died,
        or lost Redis for longer than the lease."""
        found = self._redis.zrangebyscore(RUNNING_LEASES_KEY, "-inf", self.redis_now(), start=0, num=limit)
        return [text(run_id) for run_id in found]

    def resume_abandoned(self, run_id: str, message: str) -> bool:
        """Queue again a running run whose lease expired; False when it ended, or a live lease holds it."""
        keys = [*self._moving_keys(run_id), lease_key(run_id), RUNNING_LEASES_KEY]
        return bool(self._resume_abandoned(keys=keys, args=[run_id, message, FINISHED_RUN_TTL_S]) == 1)

    def index_unleased_running_runs(self) -> int:
        """Enter the running runs missing from the lease index, due at once; answers how many.

        Runs left `running` by a version without the index would never be found if their worker died.
        One pass over the run records (SCAN), so a worker does it once, when it starts.
        """
        entered = 0
        for key in self._redis.scan_iter(match=run_key("*"), count=1000, _type="HASH"):
            run_id = text(key).removeprefix(run_key(""))
            if ":" in run_id:
                continue  # a hash of the run's own (its evaluation), not a run record
            entered += int(self._index_unleased(keys=[run_key(run_id), RUNNING_LEASES_KEY], args=[run_id]))
        return entered

    def lease_held(self, run_id: str) -> bool:
        return bool(self._redis.exists(lease_key(run_id)))

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
        now: float | None = None,
        holder: str = "",
    ) -> bool:
        """Move the run to `status` from one of `allowed_from`; with a `holder`, refused (False) while
        another executor holds the run's lease."""
        args: list[RedisValue] = [
            ",".join(allowed_from),
            status,
            time.time() if now is None else now,
            FINISHED_RUN_TTL_S,
            holder,
        ]
        for name, value in (fields or {}).items():
            args.extend((name, value))
        keys = [*self._moving_keys(run_id), lease_key(run_id)]
        return bool(self._transition(keys=keys, args=args) == 1)

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        message: str,
        now: float,
        *,
        holder: str = "",
        **metrics: RedisValue,
    ) -> bool:
        """Record the end of a running run; False when it was not running (already ended elsewhere) or,
        given its executor's `holder`, when another executor took it over after that one's lease expired."""
        fields: dict[str, RedisValue] = {"message": message, "finished_at": now, **metrics}
        return self.transition(run_id, ("running",), status, fields, now=now, holder=holder)

    def delete(self, record: RunRecord) -> str:
        """Remove a finished run's keys: its record, index entry, evaluation, log and events.

        Answers "deleted", "missing", or the status (queued, running) that kept it.
        """
        run_id = record.run_id
        keys = [
            run_key(run_id),
            user_runs_key(record.user_id),
            lease_key(run_id),
            evaluation_key(run_id),
            run_log_key(run_id),
            run_events_key(run_id),
        ]
        return text(self._delete(keys=keys, args=[run_id]))

    def retire_corpus(self, corpus_id: str) -> Retirement:
        """Mark an uploaded corpus as going away unless a queued or running run trains on it."""
        if not is_record_id(corpus_id):
            return Retirement("missing")
        return self._retire_input(corpus_key(corpus_id), corpus_runs_key(corpus_id))

    def retire_tokenizer(self, tokenizer_id: str) -> Retirement:
        """Mark a tokenizer as going away unless it is still training or a queued or running run uses it."""
        if not is_record_id(tokenizer_id):
            return Retirement("missing")
        return self._retire_input(tokenizer_key(tokenizer_id), tokenizer_runs_key(tokenizer_id))

    def _retire_input(self, record_key: str, runs_key: str) -> Retirement:
        answer = self._retire(keys=[record_key, runs_key])
        parts = [text(part) for part in answer] if isinstance(answer, list) else []
        if parts[:1] == ["retired"]:
            return Retirement("retired")
        if parts[:1] == ["in-use"]:
            return Retirement("in-use", active_runs=int(parts[1]))
        if parts[:1] == ["busy"]:
            return Retirement("busy", status=parts[2])
        return Retirement("missing")

    def request_cancel(self, run_id: str) -> RunStatus | None:
        """Ask an active run to stop; answers the status it had (None for an unknown run).

        The worker that trains the run sees the flag at its next heartbeat and stops; a queued run
        ends canceled as soon as a worker picks it up. A finished run is left as it is.
        """
        if not is_record_id(run_id):
            return None
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


def _outcome(answer: object) -> tuple[str, str]:
    """A script's `{outcome, detail}` answer as text."""
    parts = [*(text(part) for part in answer), "", ""] if isinstance(answer, list) else ["", ""]
    return parts[0], parts[1]


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
        train_s=float(raw.get("train_s") or 0.0),
        attempt_started_at=optional_float(raw, "attempt_started_at"),
        queue=raw.get("queue") or TRAINING_QUEUE,
        worker=raw.get("worker") or None,
    )
