"""trainer_store.runs.RunStore against the real Redis: records, leases, heartbeats and checked transitions."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from schemas.status import RunStatus
from scripts.devstack import free_port
from trainer_store.runs import (
    FINISHED_RUN_TTL_S,
    USER_INDEX_MAX,
    RunRecord,
    RunStore,
    lease_key,
    run_key,
    user_runs_key,
)

SNOWFLAKE = 123456789012345678
NOW = 1700000000.25
REQUEST: dict[str, object] = {"model_family": "gpt2", "num_epochs": 2, "corpus_path": "/c/notes.txt"}


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    return RunStore(redis_client)


def _create(store: RunStore, run_id: str = "run-1", user_id: int = SNOWFLAKE, now: float = NOW) -> RunRecord:
    return store.create(run_id=run_id, job_id=f"job-{run_id}", user_id=user_id, request=REQUEST, now=now)


def _get(store: RunStore, run_id: str = "run-1") -> RunRecord:
    record = store.get(run_id)
    assert record is not None
    return record


def test_create_then_get(store: RunStore, redis_client: redis.Redis) -> None:
    created = _create(store)
    assert created == RunRecord(
        run_id="run-1",
        job_id="job-run-1",
        status="queued",
        user_id=SNOWFLAKE,
        created_at=NOW,
        request=REQUEST,
    )
    record = _get(store)
    assert record.run_id == "run-1"
    assert record.job_id == "job-run-1"
    assert record.status == "queued"
    assert record.user_id == SNOWFLAKE
    assert record.created_at == NOW
    assert record.request == REQUEST
    assert record.message == "queued"
    assert record.attempt == 0
    assert record.started_at is None
    assert record.finished_at is None
    assert record.last_heartbeat_ts is None
    assert record.progress is None
    assert record.loss is None
    assert record.perplexity is None
    assert record.artifact_path is None
    assert record.error_kind is None
    assert record.cancel_requested is False
    assert record.is_terminal is False
    # An active run lives as long as the run: no TTL yet.
    assert redis_client.ttl(run_key("run-1")) == -1


def test_get_unknown_run_is_none(store: RunStore) -> None:
    assert store.get("nope") is None


@pytest.mark.parametrize(
    "fragment",
    [
        {"last_heartbeat_ts": "5.0"},
        {"last_event": "{}", "last_seq": "3"},
        {"run_id": "run-1", "last_seq": "3"},
        {"status": "running", "user_id": "7"},
    ],
)
def test_get_of_a_fragment_without_run_id_or_status_is_none(
    fragment: dict[FieldT, EncodableT], store: RunStore, redis_client: redis.Redis
) -> None:
    """What a late write leaves after a record was deleted is no run: the run is unknown."""
    redis_client.hset(run_key("run-1"), mapping=fragment)
    assert store.get("run-1") is None


def test_get_with_a_decoding_client(redis_url: str, store: RunStore) -> None:
    _create(store)
    text_client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        record = RunStore(text_client).get("run-1")
    finally:
        text_client.close()
    assert record is not None
    assert record.user_id == SNOWFLAKE
    assert record.request == REQUEST


def test_keys_are_namespaced() -> None:
    assert run_key("abc") == "trainer:runs:abc"
    assert lease_key("abc") == "trainer:runs:abc:lease"
    assert user_runs_key(42) == "trainer:users:42:runs"


def test_claim_takes_the_lease_once(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    assert redis_client.get(lease_key("run-1")) == b"worker-a"
    lease_ttl = redis_client.pttl(lease_key("run-1"))
    assert 0 < lease_ttl <= 30_000
    record = _get(store)
    assert record.status == "running"
    assert record.started_at == NOW + 1
    assert record.last_heartbeat_ts == NOW + 1
    assert record.message == "running"
    assert record.attempt == 1
    assert redis_client.hget(run_key("run-1"), "worker") == b"worker-a"

    assert not store.claim("run-1", "worker-b", lease_s=30, now=NOW + 2)
    assert redis_client.get(lease_key("run-1")) == b"worker-a"
    assert _get(store).attempt == 1
    # The holder itself cannot take it twice either.
    assert not store.claim("run-1", "worker-a", lease_s=30, now=NOW + 3)


def test_claim_after_the_lease_is_released_counts_another_attempt(store: RunStore) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    store.release("run-1", "worker-a")
    assert store.claim("run-1", "worker-b", lease_s=30, now=NOW + 5)
    record = _get(store)
    assert record.attempt == 2
    assert record.started_at == NOW + 5


@pytest.mark.parametrize("terminal", ["completed", "failed", "canceled"])
def test_claim_on_a_terminal_run_fails_and_leaves_no_lease(
    store: RunStore, redis_client: redis.Redis, terminal: RunStatus
) -> None:
    _create(store)
    assert store.transition("run-1", ("queued",), terminal, {"message": "ended"})
    assert not store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    assert redis_client.exists(lease_key("run-1")) == 0
    record = _get(store)
    assert record.status == terminal
    assert record.attempt == 0
    assert record.started_at is None


def test_claim_on_a_missing_run_fails_and_leaves_no_lease(store: RunStore, redis_client: redis.Redis) -> None:
    assert not store.claim("ghost", "worker-a", lease_s=30, now=NOW)
    assert redis_client.exists(lease_key("ghost")) == 0
    assert redis_client.exists(run_key("ghost")) == 0


def test_renew_only_by_the_holder_and_writes_the_heartbeat(
    store: RunStore, redis_client: redis.Redis
) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=1, now=NOW + 1)
    assert redis_client.pttl(lease_key("run-1")) <= 1000

    assert not store.renew("run-1", "worker-b", lease_s=60, now=NOW + 9)
    assert _get(store).last_heartbeat_ts == NOW + 1
    assert redis_client.pttl(lease_key("run-1")) <= 1000

    assert store.renew("run-1", "worker-a", lease_s=60, now=NOW + 10.5)
    assert _get(store).last_heartbeat_ts == NOW + 10.5
    assert 1000 < redis_client.pttl(lease_key("run-1")) <= 60_000


def test_renew_without_a_lease_fails(store: RunStore) -> None:
    _create(store)
    assert not store.renew("run-1", "worker-a", lease_s=60, now=NOW + 1)
    assert _get(store).last_heartbeat_ts is None


def test_renew_of_a_deleted_run_fails_and_recreates_nothing(
    store: RunStore, redis_client: redis.Redis
) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=1, now=NOW + 1)
    redis_client.delete(run_key("run-1"))
    assert not store.renew("run-1", "worker-a", lease_s=60, now=NOW + 2)
    assert redis_client.exists(run_key("run-1")) == 0
    assert redis_client.pttl(lease_key("run-1")) <= 1000


def test_release_only_by_the_holder(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    store.release("run-1", "worker-b")
    assert redis_client.get(lease_key("run-1")) == b"worker-a"
    store.release("run-1", "worker-a")
    assert redis_client.exists(lease_key("run-1")) == 0
    # Releasing a lease nobody holds is harmless.
    store.release("run-1", "worker-a")
    assert redis_client.exists(lease_key("run-1")) == 0


def test_finish_moves_running_to_completed_once(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    assert store.finish(
        "run-1", "completed", "done", NOW + 20, loss=1.5, perplexity=4.25, artifact_path="/a/run-1"
    )
    record = _get(store)
    assert record.status == "completed"
    assert record.is_terminal
    assert record.message == "done"
    assert record.finished_at == NOW + 20
    assert record.loss == 1.5
    assert record.perplexity == 4.25
    assert record.artifact_path == "/a/run-1"
    ttl = redis_client.ttl(run_key("run-1"))
    assert FINISHED_RUN_TTL_S - 60 < ttl <= FINISHED_RUN_TTL_S

    assert not store.finish("run-1", "failed", "too late", NOW + 30, error_kind="system")
    record = _get(store)
    assert record.status == "completed"
    assert record.message == "done"
    assert record.finished_at == NOW + 20
    assert record.error_kind is None


def test_finish_of_a_queued_run_is_refused(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert not store.finish("run-1", "completed", "done", NOW + 1)
    assert _get(store).status == "queued"
    assert redis_client.ttl(run_key("run-1")) == -1


def test_finish_by_an_attempt_whose_run_was_taken_over_is_refused(store: RunStore) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    # worker-a's lease ends (released here, as its expiry would) and worker-b takes the run up again.
    store.release("run-1", "worker-a")
    assert store.claim("run-1", "worker-b", lease_s=30, now=NOW + 5)
    assert not store.finish("run-1", "completed", "done late", NOW + 9, holder="worker-a", loss=1.0)
    record = _get(store)
    assert (record.status, record.worker, record.attempt, record.loss) == ("running", "worker-b", 2, None)
    assert store.finish("run-1", "completed", "done", NOW + 10, holder="worker-b", loss=2.0)
    assert (_get(store).status, _get(store).loss) == ("completed", 2.0)


def test_finish_by_an_attempt_whose_lease_ended_unclaimed_is_recorded(store: RunStore) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    store.release("run-1", "worker-a")
    # Nobody took the run over: the attempt that trained it still records its end.
    assert store.finish("run-1", "completed", "done", NOW + 9, holder="worker-a")
    assert _get(store).status == "completed"


def test_failed_finish_records_the_error_kind(store: RunStore) -> None:
    _create(store)
    assert store.claim("run-1", "worker-a", lease_s=30, now=NOW + 1)
    assert store.finish("run-1", "failed", "out of memory", NOW + 2, error_kind="system")
    record = _get(store)
    assert record.status == "failed"
    assert record.error_kind == "system"
    assert record.message == "out of memory"


def test_transition_refuses_from_a_status_not_allowed(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert not store.transition("run-1", ("running",), "completed", {"message": "nope"})
    record = _get(store)
    assert record.status == "queued"
    assert record.message == "queued"
    assert redis_client.ttl(run_key("run-1")) == -1


def test_transition_without_fields(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert store.transition("run-1", ("queued", "running"), "running")
    record = _get(store)
    assert record.status == "running"
    assert record.message == "queued"
    # A non-terminal status keeps the record without a TTL.
    assert redis_client.ttl(run_key("run-1")) == -1


def test_transition_of_a_missing_run_creates_nothing(store: RunStore, redis_client: redis.Redis) -> None:
    assert not store.transition("ghost", ("queued",), "failed", {"message": "x"})
    assert redis_client.exists(run_key("ghost")) == 0


def test_user_index_keeps_the_run_ids(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store, "run-a", now=NOW)
    _create(store, "run-b", now=NOW + 1)
    _create(store, "run-c", user_id=7, now=NOW + 2)
    members = redis_client.zrange(user_runs_key(SNOWFLAKE), 0, -1, withscores=True)
    assert members == [(b"run-a", NOW), (b"run-b", NOW + 1)]
    assert redis_client.zrange(user_runs_key(7), 0, -1) == [b"run-c"]
    assert 0 < redis_client.ttl(user_runs_key(7)) <= FINISHED_RUN_TTL_S


def test_user_index_is_bounded_and_keeps_the_newest(store: RunStore, redis_client: redis.Redis) -> None:
    key = user_runs_key(5)
    redis_client.zadd(key, {f"old-{i}": float(i) for i in range(USER_INDEX_MAX)})
    _create(store, "newest", user_id=5, now=NOW)
    assert redis_client.zcard(key) == USER_INDEX_MAX
    assert redis_client.zscore(key, "old-0") is None
    assert redis_client.zscore(key, "old-1") == 1.0
    assert redis_client.zscore(key, "newest") == NOW


def test_save_progress_round_trips(store: RunStore) -> None:
    _create(store)
    progress: dict[str, object] = {"epoch": 1, "total_epochs": 2, "step": 40, "loss": 2.75, "ts": NOW + 3}
    store.save_progress("run-1", progress)
    assert _get(store).progress == progress
    store.save_progress("run-1", {"epoch": 2})
    assert _get(store).progress == {"epoch": 2}


def test_fields_written_by_others_are_parsed(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    redis_client.hset(run_key("run-1"), mapping={"cancel_requested": "1", "progress": "[1,2]"})
    record = _get(store)
    assert record.cancel_requested is True
    # Progress that is not a JSON object is ignored rather than mis-typed.
    assert record.progress is None


def test_cancel_requested(store: RunStore, redis_client: redis.Redis, redis_url: str) -> None:
    _create(store)
    assert store.cancel_requested("run-1") is False
    assert store.cancel_requested("ghost") is False
    redis_client.hset(run_key("run-1"), "cancel_requested", "0")
    assert store.cancel_requested("run-1") is False
    redis_client.hset(run_key("run-1"), "cancel_requested", "1")
    assert store.cancel_requested("run-1") is True
    text_client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert RunStore(text_client).cancel_requested("run-1") is True
    finally:
        text_client.close()


def test_last_seq(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    assert _get(store).last_seq == 0
    redis_client.hset(run_key("run-1"), "last_seq", 12)
    assert _get(store).last_seq == 12


def test_a_record_with_an_unknown_status_is_an_error(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store)
    redis_client.hset(run_key("run-1"), "status", "exploded")
    with pytest.raises(ValueError, match="unknown run status 'exploded'"):
        store.get("run-1")


def test_ping(store: RunStore) -> None:
    assert store.ping() is True


def test_ping_of_an_unreachable_redis_raises() -> None:
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.ConnectionError):
            RunStore(client).ping()
    finally:
        client.close()


def test_request_cancel_flags_active_runs_only(store: RunStore, redis_client: redis.Redis) -> None:
    _create(store, "queued-run")
    _create(store, "done-run")
    assert store.claim("done-run", "w", 60, NOW)
    assert store.finish("done-run", "completed", "completed", NOW)

    assert store.request_cancel("queued-run") == "queued"
    assert store.cancel_requested("queued-run")
    assert store.request_cancel("done-run") == "completed"
    assert not store.cancel_requested("done-run")
    assert store.request_cancel("ghost") is None
    assert redis_client.exists(run_key("ghost")) == 0


def test_hand_back_requeues_a_running_run_without_counting_the_attempt(store: RunStore) -> None:
    _create(store)
    assert not store.hand_back("run-1", "back"), "a queued run is not handed back"
    assert store.claim("run-1", "w", 60, NOW)
    assert store.hand_back("run-1", "requeued after a worker shutdown")
    record = _get(store)
    assert (record.status, record.message, record.attempt) == (
        "queued",
        "requeued after a worker shutdown",
        0,
    )
