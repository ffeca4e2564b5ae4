"""trainer_tasks.maintenance: periodic checks, one worker at a time, from a thread of the main process."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import redis

from schemas.queues import RESUMED_PRIORITY
from scripts import devstack
from tests.test_runner import SendTaskRecorder
from trainer_store.runs import RUNNING_LEASES_KEY, RunStore
from trainer_store.settings import Settings
from trainer_tasks.app import TRAIN_TASK, celery_app
from trainer_tasks.maintenance import (
    LOCK_KEY,
    Maintenance,
    MaintenanceStep,
    PeriodicCheck,
    checks_for,
    for_this_worker,
    start_checks_for,
)


class Calls:
    """A check that notes when each call began (monotonic seconds)."""

    def __init__(self, fail: bool = False) -> None:
        self.times: list[float] = []
        self.fail = fail

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        if self.fail:
            raise RuntimeError("the store is away")


def test_each_check_runs_under_the_lock_and_one_failing_does_not_stop_the_next(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    failing, next_one = Calls(fail=True), Calls()
    held: list[bytes | str | None] = []
    checks = [
        PeriodicCheck("failing", failing),
        PeriodicCheck("looks at the lock", lambda: held.append(redis_client.get(LOCK_KEY))),
        PeriodicCheck("next", next_one),
    ]
    maintenance = Maintenance(redis_client, checks, 60.0, "worker-a")
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.maintenance"):
        assert maintenance.run_once()
    assert (len(failing.times), len(next_one.times), held) == (1, 1, [b"worker-a"])
    assert "periodic check 'failing' failed" in caplog.text
    assert not redis_client.exists(LOCK_KEY)  # released for the next worker


def test_a_worker_that_finds_the_lock_taken_does_nothing(redis_client: redis.Redis) -> None:
    calls = Calls()
    redis_client.set(LOCK_KEY, "worker-b", px=60_000)
    assert not Maintenance(redis_client, [PeriodicCheck("c", calls)], 60.0, "worker-a").run_once()
    assert calls.times == []
    assert redis_client.get(LOCK_KEY) == b"worker-b"


def test_redis_away_skips_a_round_and_a_lock_it_cannot_release_expires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service, url = devstack.start_redis(tmp_path)
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        maintenance = Maintenance(client, [PeriodicCheck("stops redis", lambda: service.stop())], 60.0, "w")
        with caplog.at_level(logging.WARNING, logger="trainer_tasks.maintenance"):
            assert maintenance.run_once()  # ran; the lock could not be released
            assert not maintenance.run_once()  # no Redis: no lock, no checks
    finally:
        service.stop()
    assert "maintenance lock not released (it expires by itself)" in caplog.text
    assert "periodic checks skipped" in caplog.text


def test_the_loop_runs_every_interval_until_stopped(redis_client: redis.Redis) -> None:
    ran = threading.Event()
    maintenance = Maintenance(redis_client, [PeriodicCheck("c", lambda: ran.set())], 0.05, "w")
    maintenance.stop()  # never started: nothing to wait for
    maintenance = Maintenance(redis_client, [PeriodicCheck("c", lambda: ran.set())], 0.05, "w")
    maintenance.start()
    assert ran.wait(10)
    began = time.monotonic()
    maintenance.stop()
    assert time.monotonic() - began < 5


def test_start_checks_run_once_when_the_loop_starts_lock_or_not(redis_client: redis.Redis) -> None:
    at_start, periodic = Calls(), Calls()
    redis_client.set(LOCK_KEY, "worker-b", px=60_000)  # another worker is running its checks
    maintenance = Maintenance(
        redis_client,
        [PeriodicCheck("periodic", periodic, exclusive=False)],
        0.05,
        "worker-a",
        start_checks=[PeriodicCheck("at start", at_start)],
    )
    maintenance.start()
    devstack.wait_until(lambda: len(periodic.times) >= 3, 10, "three rounds of periodic checks")
    maintenance.stop()
    assert len(at_start.times) == 1
    assert at_start.times[0] <= periodic.times[0]


class FailsFirst(Calls):
    """Fails its first `failures` calls, as a check does while Redis is still away."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def __call__(self) -> None:
        self.fail = len(self.times) < self.failures
        super().__call__()


def test_a_start_check_that_fails_is_tried_each_round_until_it_passes(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    at_start, periodic = FailsFirst(failures=2), Calls()
    maintenance = Maintenance(
        redis_client,
        [PeriodicCheck("periodic", periodic, exclusive=False)],
        0.05,
        "worker-a",
        start_checks=[PeriodicCheck("at start", at_start)],
    )
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.maintenance"):
        maintenance.start()
        devstack.wait_until(lambda: len(periodic.times) >= 5, 10, "five rounds of periodic checks")
        maintenance.stop()
    # Failed at start and in the first round, passed in the second, and was not run again.
    assert len(at_start.times) == 3
    assert caplog.text.count("periodic check 'at start' failed") == 2


def test_a_starting_worker_enters_running_runs_the_lease_index_lacks(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(redis_client)
    store.create(run_id="r1", job_id="j", user_id=1, request={}, now=1.0)
    assert store.claim("r1", "host:1:old", 60.0, time.time())
    redis_client.zrem(RUNNING_LEASES_KEY, "r1")  # left by a version without the index
    [index_check] = start_checks_for(redis_client)
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.maintenance"):
        assert index_check.run() == 1
        assert index_check.run() == 0
    assert redis_client.zscore(RUNNING_LEASES_KEY, "r1") is not None
    assert [record.getMessage() for record in caplog.records] == [
        "1 running runs were missing from the lease index; the check for dead workers sees them now"
    ]


def test_every_worker_looks_for_dead_workers_runs_and_sweeps_expired_runs(redis_url: str) -> None:
    built = for_this_worker({"REDIS_URL": redis_url, "APP__MAINTENANCE_INTERVAL_S": "7"})
    names = ["runs whose worker died", "working files of expired runs"]
    assert [(check.name, check.exclusive) for check in built.checks] == list(
        zip(names, [False, True], strict=True)
    )
    assert built.interval_s == 7.0
    assert [check.name for check in built.start_checks] == ["running runs missing from the lease index"]
    # Never longer than half the lease: a dead worker's run is found within 1.5 leases of its last beat.
    short_lease = for_this_worker({"REDIS_URL": redis_url, "APP__LEASE_S": "3"})
    assert short_lease.interval_s == 1.5
    assert [check.name for check in checks_for(Settings(), redis.Redis())] == names
    assert MaintenanceStep in celery_app.steps["worker"]


def test_shared_checks_run_even_when_another_worker_holds_the_lock(redis_client: redis.Redis) -> None:
    shared, exclusive = Calls(), Calls()
    redis_client.set(LOCK_KEY, "worker-b", px=60_000)
    checks = [PeriodicCheck("shared", shared, exclusive=False), PeriodicCheck("exclusive", exclusive)]
    maintenance = Maintenance(redis_client, checks, 60.0, "worker-a")
    assert not maintenance.run_once()
    assert (len(shared.times), exclusive.times) == (1, [])


def test_the_dead_workers_check_sends_an_abandoned_run_back_ahead(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SendTaskRecorder()
    monkeypatch.setattr(celery_app, "send_task", recorder)
    store = RunStore(redis_client)
    store.create(run_id="r1", job_id="j", user_id=1, request={}, now=1.0, queue="gpu")
    assert store.claim("r1", "host:1:dead", 0.001, time.time())
    time.sleep(0.01)  # its worker died: the lease expires
    [dead_workers, _] = checks_for(Settings(), redis_client)
    dead_workers.run()
    assert recorder.calls == [(TRAIN_TASK, ["r1"], "gpu", RESUMED_PRIORITY, None, True)]
    record = store.get("r1")
    assert record is not None
    assert record.status == "queued"
