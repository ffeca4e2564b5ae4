"""trainer_tasks.heartbeat.Heartbeat on the real store: lease renewal, heartbeat time, cancel, lease loss."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scripts.devstack import free_port
from trainer_store.runs import RunRecord, RunStore, lease_key, run_key
from trainer_tasks.heartbeat import Heartbeat

RUN_ID = "run-1"
HOLDER = "host:1:abcd"


class CountingClock:
    """Answers 5000.0, 5001.0, ...; counts its calls so a test can see the thread beat."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
            return 4999.0 + self.calls


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=RUN_ID, job_id="job-1", user_id=7, request={}, now=1.0)
    # A short lease, so a renewal is visible in its remaining time.
    assert store.claim(RUN_ID, HOLDER, 1.0, 2.0)
    return store


def record_of(store: RunStore) -> RunRecord:
    record = store.get(RUN_ID)
    assert record is not None
    return record


def heartbeat(store: RunStore, clock: Callable[[], float], interval_s: float = 60.0) -> Heartbeat:
    return Heartbeat(store, RUN_ID, HOLDER, interval_s=interval_s, lease_s=60.0, clock=clock)


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_beat_renews_the_lease_and_writes_the_heartbeat(store: RunStore, redis_client: redis.Redis) -> None:
    assert redis_client.pttl(lease_key(RUN_ID)) <= 1000
    beat = heartbeat(store, CountingClock())
    beat.beat()
    assert redis_client.pttl(lease_key(RUN_ID)) > 50_000
    assert redis_client.get(lease_key(RUN_ID)) == HOLDER.encode()
    assert record_of(store).last_heartbeat_ts == 5000.0
    assert not beat.lease_lost.is_set()
    assert not beat.cancel_requested.is_set()
    beat.beat()
    assert record_of(store).last_heartbeat_ts == 5001.0


def test_beat_notices_another_holder_took_the_lease(store: RunStore, redis_client: redis.Redis) -> None:
    redis_client.set(lease_key(RUN_ID), "host:2:ffff", px=60_000)
    beat = heartbeat(store, CountingClock())
    beat.beat()
    assert beat.lease_lost.is_set()
    # The other holder keeps its lease; this one writes no heartbeat.
    assert redis_client.get(lease_key(RUN_ID)) == b"host:2:ffff"
    assert record_of(store).last_heartbeat_ts == 2.0


def test_beat_notices_an_expired_lease(store: RunStore, redis_client: redis.Redis) -> None:
    redis_client.delete(lease_key(RUN_ID))
    beat = heartbeat(store, CountingClock())
    beat.beat()
    assert beat.lease_lost.is_set()
    assert not redis_client.exists(lease_key(RUN_ID))


def test_beat_on_a_deleted_run_writes_nothing_and_reports_the_lease_lost(
    store: RunStore, redis_client: redis.Redis
) -> None:
    redis_client.delete(run_key(RUN_ID))
    beat = heartbeat(store, CountingClock())
    beat.beat()
    assert beat.lease_lost.is_set()
    # The deleted run is not brought back as a fragment, and its lease is not extended.
    assert not redis_client.exists(run_key(RUN_ID))
    assert redis_client.pttl(lease_key(RUN_ID)) <= 1000


@pytest.mark.parametrize(("flag", "expected"), [("1", True), ("0", False), ("", False)])
def test_beat_reads_the_cancel_flag(
    flag: str, expected: bool, store: RunStore, redis_client: redis.Redis
) -> None:
    redis_client.hset(run_key(RUN_ID), "cancel_requested", flag)
    beat = heartbeat(store, CountingClock())
    beat.beat()
    assert beat.cancel_requested.is_set() is expected
    assert not beat.lease_lost.is_set()


@pytest.fixture
def unreachable() -> Iterator[redis.Redis]:
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    yield client
    client.close()


def test_beat_swallows_a_redis_error(unreachable: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    beat = heartbeat(RunStore(unreachable), CountingClock())
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.heartbeat"):
        beat.beat()
    assert not beat.lease_lost.is_set()
    assert not beat.cancel_requested.is_set()
    assert any("heartbeat failed" in record.getMessage() for record in caplog.records)


def heartbeat_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"heartbeat-{RUN_ID}"]


def test_the_thread_beats_repeatedly_and_stops_on_exit(store: RunStore, redis_client: redis.Redis) -> None:
    clock = CountingClock()
    with heartbeat(store, clock, interval_s=0.01) as running:
        assert [thread.daemon for thread in heartbeat_threads()] == [True]
        assert wait_for(lambda: clock.calls >= 3)
        assert wait_for(lambda: (record_of(store).last_heartbeat_ts or 0.0) >= 5002.0)
        assert redis_client.pttl(lease_key(RUN_ID)) > 50_000
        redis_client.hset(run_key(RUN_ID), "cancel_requested", "1")
        assert running.cancel_requested.wait(timeout=5.0)
    assert heartbeat_threads() == []
    beats = clock.calls
    # Joined: no further beat can happen.
    time.sleep(0.05)
    assert clock.calls == beats
    assert not running.lease_lost.is_set()


def test_the_thread_does_not_beat_before_the_first_interval(store: RunStore) -> None:
    clock = CountingClock()
    with heartbeat(store, clock, interval_s=60.0):
        assert len(heartbeat_threads()) == 1
    assert clock.calls == 0
    assert heartbeat_threads() == []
    assert record_of(store).last_heartbeat_ts == 2.0
