"""Checks in each worker's main process: once at start, running runs enter the lease index; then
periodically, runs whose worker died go back to their queue (every worker looks, the move is atomic) and
the working files of expired runs leave the store (one worker at a time, under a short Redis lock)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis
from celery import bootsteps

from trainer_store.cleanup import sweep_expired_runs
from trainer_store.layout import FileStores
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_tasks.abandoned import resume_abandoned_runs

log = logging.getLogger(__name__)

# Held by the worker running the checks; it expires by itself if that worker dies mid-way.
LOCK_KEY = "trainer:maintenance:lock"
LOCK_S = 300.0

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class PeriodicCheck:
    name: str
    run: Callable[[], object]
    # Run by one worker at a time, under the lock; a check that is safe to run everywhere at once is not
    # held up by a worker that died holding the lock.
    exclusive: bool = True


def checks_for(settings: Settings, client: redis.Redis) -> list[PeriodicCheck]:
    from trainer_tasks.tasks import requeue  # the tasks module imports this one through the Celery app

    files = FileStores.from_settings(settings)
    store = RunStore(client)
    return [
        PeriodicCheck(
            "runs whose worker died", lambda: resume_abandoned_runs(store, requeue), exclusive=False
        ),
        PeriodicCheck(
            "working files of expired runs",
            lambda: sweep_expired_runs(files, client, store.redis_now()),
        ),
    ]


def start_checks_for(client: redis.Redis) -> list[PeriodicCheck]:
    """Checks each worker runs once, when it starts: a pass over every run record is too dear for each
    interval, and each worker makes its own so that no lock held elsewhere can skip it."""
    store = RunStore(client)
    return [
        PeriodicCheck(
            "running runs missing from the lease index", lambda: _index_unleased(store), exclusive=False
        )
    ]


def _index_unleased(store: RunStore) -> int:
    entered = store.index_unleased_running_runs()
    if entered:
        log.warning(
            "%d running runs were missing from the lease index; the check for dead workers sees them now",
            entered,
        )
    return entered


def interval_for(settings: Settings) -> float:
    """At most half the lease: a dead worker's run is found within 1.5 leases of its last heartbeat."""
    return min(settings.maintenance_interval_s, settings.lease_s / 2)


class Maintenance:
    """Runs the checks every `interval_s` from a thread of its own, when it gets the lock."""

    def __init__(
        self,
        client: redis.Redis,
        checks: Sequence[PeriodicCheck],
        interval_s: float,
        holder: str,
        start_checks: Sequence[PeriodicCheck] = (),
    ) -> None:
        self._redis = client
        self.checks = checks
        self.start_checks = start_checks
        self.interval_s = interval_s
        self._holder = holder
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)

    def run_once(self) -> bool:
        """The shared checks, then the exclusive ones if no other worker is running them now; answers
        whether this one did."""
        self._run([check for check in self.checks if not check.exclusive])
        try:
            if not self._redis.set(LOCK_KEY, self._holder, px=int(LOCK_S * 1000), nx=True):
                return False
        except redis.RedisError as exc:
            log.warning("periodic checks skipped: %s", exc)
            return False
        try:
            self._run([check for check in self.checks if check.exclusive])
        finally:
            try:
                self._release(keys=[LOCK_KEY], args=[self._holder])
            except redis.RedisError as exc:
                log.warning("maintenance lock not released (it expires by itself): %s", exc)
        return True

    def _run(self, checks: Sequence[PeriodicCheck]) -> list[PeriodicCheck]:
        """Runs each check; answers those that failed."""
        failed: list[PeriodicCheck] = []
        for check in checks:
            try:
                check.run()
            except Exception:
                # One failing check (a store that is away) must not stop the others or the thread.
                log.exception("periodic check %r failed", check.name)
                failed.append(check)
        return failed

    def _loop(self) -> None:
        pending = self._run(self.start_checks)
        while not self._stop.wait(self.interval_s):
            # A start check that failed (Redis away as the worker started) is tried each round till it passes.
            pending = self._run(pending)
            self.run_once()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the checks under way, if any; a loop never started has nothing to wait for."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def for_this_worker(env: Mapping[str, str] | None = None) -> Maintenance:
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return Maintenance(
        client,
        checks_for(settings, client),
        interval_for(settings),
        holder,
        start_checks=start_checks_for(client),
    )


class MaintenanceStep(bootsteps.StartStopStep):
    """Starts the checks with the worker's main process, once its pool is up, and stops them with it."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.maintenance = for_this_worker()

    def start(self, parent: object) -> None:
        self.maintenance.start()

    def stop(self, parent: object) -> None:
        self.maintenance.stop()

    terminate = stop  # a cold shutdown (the Procfile's SIGTERM) stops the checks the same way
