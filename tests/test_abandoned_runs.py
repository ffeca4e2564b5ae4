"""Runs whose worker died: the index of leases, and the check that sends them back to their queue."""

from __future__ import annotations

import time

import pytest
import redis

from schemas.events import TrainFailed
from tests.streams import sent_events
from tests.test_runner import FakeTraining, Requeued, make_worker, never_called
from trainer_store.jobs import evaluation_key
from trainer_store.runs import RUNNING_LEASES_KEY, RunStore, lease_key, queue_waiting_key, run_key
from trainer_store.settings import Settings
from trainer_tasks.abandoned import RESUMED_MESSAGE, resume_abandoned_runs
from trainer_tasks.runner import MAX_ATTEMPTS, execute_run

USER_ID = 42


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    return RunStore(redis_client)


def create(store: RunStore, run_id: str, now: float = 1.0, queue: str = "training") -> None:
    store.create(run_id=run_id, job_id="j", user_id=USER_ID, request={}, now=now, queue=queue)


def lease_expiry(redis_client: redis.Redis, run_id: str) -> float | None:
    return redis_client.zscore(RUNNING_LEASES_KEY, run_id)


def expire_lease(redis_client: redis.Redis, run_id: str) -> None:
    """What a dead worker leaves: its lease gone, its index entry in the past."""
    redis_client.delete(lease_key(run_id))
    redis_client.zadd(RUNNING_LEASES_KEY, {run_id: 1.0})


def test_the_index_follows_the_lease_from_claim_to_end(redis_client: redis.Redis, store: RunStore) -> None:
    create(store, "r1")
    create(store, "r2")
    assert lease_expiry(redis_client, "r1") is None  # queued runs hold no lease
    before = time.time()
    assert store.claim("r1", "w1", 60.0, time.time())
    first = lease_expiry(redis_client, "r1")
    assert first is not None
    assert before + 59 < first < time.time() + 61
    time.sleep(0.01)
    assert store.renew("r1", "w1", 120.0, time.time())
    renewed = lease_expiry(redis_client, "r1")
    assert renewed is not None
    assert renewed > first + 59
    assert not store.renew("r1", "w2", 120.0, time.time())  # not the holder: nothing moves
    assert lease_expiry(redis_client, "r1") == renewed
    assert store.finish("r1", "completed", "done", time.time())
    assert lease_expiry(redis_client, "r1") is None
    assert store.renew("r1", "w1", 60.0, time.time())  # a last beat after the end
    assert lease_expiry(redis_client, "r1") is None, "an ended run does not come back to the index"
    assert store.claim("r2", "w1", 60.0, time.time())
    assert store.hand_back("r2", "shutdown")
    assert lease_expiry(redis_client, "r2") is None
    assert store.expired_leases() == []


def test_a_run_whose_lease_expired_goes_back_to_its_queue_ahead_of_new_runs(
    redis_client: redis.Redis, store: RunStore
) -> None:
    create(store, "old", now=1.0, queue="gpu")
    create(store, "new", now=2.0, queue="gpu")
    assert store.claim("old", "w1", 60.0, 100.0)
    assert store.renew("old", "w1", 60.0, 130.0)  # the last heartbeat, 30 s into the attempt
    expire_lease(redis_client, "old")
    assert store.expired_leases() == ["old"]
    requeued = Requeued()
    assert resume_abandoned_runs(store, requeued) == ["old"]
    assert requeued.calls == [("old", "gpu", 0)]
    record = store.get("old")
    assert record is not None
    assert (record.status, record.message, record.attempt) == ("queued", RESUMED_MESSAGE, 1)
    assert record.train_s == pytest.approx(30.0), "the lost attempt trained until its last heartbeat"
    assert record.attempt_started_at is None
    assert redis_client.zrange(queue_waiting_key("gpu"), 0, -1) == [b"old", b"new"]
    assert store.counts()["running"] == 0
    assert store.counts()["queued"] == 2
    assert store.expired_leases() == []
    assert resume_abandoned_runs(store, requeued) == []  # found once
    assert len(requeued.calls) == 1


def test_a_live_lease_or_an_ended_run_only_puts_the_index_right(
    redis_client: redis.Redis, store: RunStore
) -> None:
    create(store, "live")
    create(store, "ended")
    create(store, "gone")
    assert store.claim("live", "w1", 60.0, time.time())
    assert store.claim("ended", "w1", 60.0, time.time())
    assert store.finish("ended", "completed", "done", time.time())
    redis_client.zadd(RUNNING_LEASES_KEY, {"live": 1.0, "ended": 1.0, "gone": 1.0})
    redis_client.delete(run_key("gone"))
    requeued = Requeued()
    assert resume_abandoned_runs(store, requeued) == []
    assert requeued.calls == []
    assert store.expired_leases() == []
    live = lease_expiry(redis_client, "live")
    assert live is not None
    assert live > time.time() + 50
    assert lease_expiry(redis_client, "ended") is None
    assert lease_expiry(redis_client, "gone") is None
    # A lease taken between the look and the move: the run is left with its new holder.
    expire_lease(redis_client, "live")
    redis_client.set(lease_key("live"), "w2", px=60_000)
    assert not store.resume_abandoned("live", RESUMED_MESSAGE)
    record = store.get("live")
    assert record is not None
    assert record.status == "running"


def test_workers_that_notice_at_once_move_the_run_once(
    redis_client: redis.Redis, redis_url: str, store: RunStore
) -> None:
    create(store, "r1")
    assert store.claim("r1", "w1", 60.0, time.time())
    expire_lease(redis_client, "r1")
    others = [RunStore(redis.Redis.from_url(redis_url)) for _ in range(2)]
    assert [other.expired_leases() for other in others] == [["r1"], ["r1"]]
    moved = [other.resume_abandoned("r1", RESUMED_MESSAGE) for other in others]
    assert moved == [True, False]
    assert store.counts()["queued"] == 1
    # And of the deliveries that follow, one claims it.
    assert [store.claim("r1", holder, 60.0, time.time()) for holder in ("w2", "w3")] == [True, False]


def test_a_send_that_fails_leaves_the_run_for_the_next_pass(
    redis_client: redis.Redis, store: RunStore
) -> None:
    create(store, "r1")
    assert store.claim("r1", "w1", 60.0, time.time())
    expire_lease(redis_client, "r1")

    def broker_away(run_id: str, queue: str, delay_s: float) -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        resume_abandoned_runs(store, broker_away)
    record = store.get("r1")
    assert record is not None
    assert record.status == "running"
    requeued = Requeued()
    assert resume_abandoned_runs(store, requeued) == ["r1"]


def test_a_run_that_keeps_losing_its_worker_ends_failed_saying_why(
    redis_client: redis.Redis, store: RunStore, settings: Settings
) -> None:
    create(store, "r1")
    requeued = Requeued()
    for attempt in range(MAX_ATTEMPTS):
        assert store.claim("r1", f"w{attempt}", 60.0, time.time())
        expire_lease(redis_client, "r1")
        assert resume_abandoned_runs(store, requeued) == ["r1"]
    assert len(requeued.calls) == MAX_ATTEMPTS
    worker = make_worker(settings, redis_client, Requeued(), FakeTraining(never_called))
    assert execute_run("r1", worker) == "failed"
    record = store.get("r1")
    assert record is not None
    assert record.status == "failed"
    [event] = [event for event in sent_events(redis_client) if event.run_id == "r1"]
    assert isinstance(event, TrainFailed)
    assert event.message == f"the run lost its worker {MAX_ATTEMPTS} times; it is not tried again"


def test_a_delivery_that_claims_the_run_before_it_is_moved_keeps_it(
    redis_client: redis.Redis, store: RunStore
) -> None:
    create(store, "r1")
    assert store.claim("r1", "w1", 60.0, time.time())
    expire_lease(redis_client, "r1")

    def delivered_at_once(run_id: str, queue: str, delay_s: float) -> None:
        assert store.claim(run_id, "w2", 60.0, time.time())  # a fast worker takes the new message

    assert resume_abandoned_runs(store, delivered_at_once) == []
    record = store.get("r1")
    assert record is not None
    assert (record.status, record.attempt) == ("running", 2)
    assert redis_client.get(lease_key("r1")) == b"w2"


def test_running_runs_missing_from_the_index_are_entered_due_at_once(
    redis_client: redis.Redis, store: RunStore
) -> None:
    for run_id in ("legacy", "indexed", "waiting", "ended"):
        create(store, run_id)
    assert store.claim("legacy", "w-old", 60.0, time.time())
    assert store.claim("indexed", "w1", 60.0, time.time())
    assert store.claim("ended", "w1", 60.0, time.time())
    assert store.finish("ended", "completed", "done", time.time())
    # What a version without the index left behind: running, its worker dead (no lease), no entry.
    redis_client.zrem(RUNNING_LEASES_KEY, "legacy")
    redis_client.delete(lease_key("legacy"))
    # A run's own hash (its evaluation) that says running is not a run record.
    redis_client.hset(evaluation_key("indexed"), mapping={"status": "running"})
    indexed_expiry = lease_expiry(redis_client, "indexed")

    assert store.index_unleased_running_runs() == 1
    due = lease_expiry(redis_client, "legacy")
    assert due is not None
    assert due <= time.time()
    assert lease_expiry(redis_client, "indexed") == indexed_expiry, "an entry of its own is kept"
    assert lease_expiry(redis_client, "waiting") is None
    assert lease_expiry(redis_client, "ended") is None
    assert store.index_unleased_running_runs() == 0
    # The next check for dead workers sends it back to its queue.
    requeued = Requeued()
    assert resume_abandoned_runs(store, requeued) == ["legacy"]
    record = store.get("legacy")
    assert record is not None
    assert record.status == "queued"
