"""Each worker's registry entry: written once its pool is up, renewed from a thread, removed at exit."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import redis
from celery import bootsteps

from trainer_store.settings import Settings
from trainer_store.workers import Accelerator, WorkerEntry, WorkerRegistry
from trainer_tasks import resources

log = logging.getLogger(__name__)


def thread_share(cores: int, me: WorkerEntry, live: Sequence[WorkerEntry]) -> int:
    """Torch threads per pool process: the machine's cores split over the pool processes of every live
    worker on this host, so several workers on one machine do not oversubscribe it."""
    others = sum(
        entry.concurrency for entry in live if entry.host == me.host and entry.hostname != me.hostname
    )
    return max(1, cores // (others + me.concurrency))


def threads_of(registry: WorkerRegistry, hostname: str, now: float) -> int:
    """The torch threads the worker's entry gives it; all the cores for a worker not in the registry."""
    try:
        found = [entry for entry in registry.live(now) if entry.hostname == hostname]
    except redis.RedisError as exc:
        log.warning("worker registry not read; training on every core: %s", exc)
        found = []
    return found[0].torch_threads if found else resources.available_cpus()


def accelerator_from(env: Mapping[str, str]) -> Accelerator:
    return "gpu" if env.get("WORKER_ACCELERATOR", "").lower() == "gpu" else "cpu"


def describe(parent: object, env: Mapping[str, str]) -> WorkerEntry:
    """This worker as the registry lists it, from Celery's worker controller and the environment."""
    hostname = getattr(parent, "hostname", None)
    concurrency = getattr(parent, "concurrency", None)
    app = getattr(parent, "app", None)
    consumed = getattr(getattr(getattr(app, "amqp", None), "queues", None), "consume_from", None)
    if not isinstance(hostname, str) or not isinstance(concurrency, int) or not isinstance(consumed, dict):
        raise TypeError("the registry step needs a Celery worker controller")
    return WorkerEntry(
        hostname=hostname,
        host=socket.gethostname(),
        queues=sorted(str(name) for name in consumed),
        concurrency=concurrency,
        accelerator=accelerator_from(env),
        devices=max(1, int(env.get("WORKER_DEVICES") or 1)),
        pid=os.getpid(),
    )


class Registration:
    """Keeps one worker's entry alive: renewed every third of its lifetime, so one missed renewal is fine."""

    def __init__(
        self,
        registry: WorkerRegistry,
        entry: WorkerEntry,
        ttl_s: float,
        cores: int,
        fixed_threads: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self.entry = entry
        self.ttl_s = ttl_s
        self._cores = cores
        self._fixed_threads = fixed_threads
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry", daemon=True)

    def renew_once(self) -> bool:
        """Write the entry with this worker's current share of the cores; False when Redis is away."""
        now = self._clock()
        try:
            threads = self._fixed_threads or thread_share(self._cores, self.entry, self._registry.live(now))
            self.entry = replace(self.entry, torch_threads=threads, last_seen=now)
            self._registry.register(self.entry, self.ttl_s, now)
        except redis.RedisError as exc:
            log.warning("worker registry entry not renewed: %s", exc)
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.renew_once()

    def start(self) -> None:
        """Registered before the worker says it is ready, so the API admits runs for its queues at once."""
        self.renew_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._registry.unregister(self.entry.hostname)
        except redis.RedisError as exc:
            log.warning("worker registry entry not removed (it expires by itself): %s", exc)


def for_worker(parent: object, env: Mapping[str, str] | None = None) -> Registration:
    env = os.environ if env is None else env
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    fixed = int(env["WORKER_TORCH_THREADS"]) if env.get("WORKER_TORCH_THREADS") else None
    return Registration(
        WorkerRegistry(client),
        describe(parent, env),
        settings.worker_ttl_s,
        resources.available_cpus(),
        fixed_threads=fixed,
    )


class RegistryStep(bootsteps.StartStopStep):
    """Registers the worker with its main process, once its pool is up, and removes it at shutdown."""

    requires = ("celery.worker.components:Pool",)

    registration: Registration | None = None

    def start(self, parent: object) -> None:
        # Described at start: by then the controller has its final concurrency and selected queues.
        self.registration = for_worker(parent)
        self.registration.start()

    def stop(self, parent: object) -> None:
        if self.registration is not None:
            self.registration.stop()

    terminate = stop
