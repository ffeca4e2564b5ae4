"""The worker registry: each live worker's entry in Redis, renewed while it lives, gone when it dies."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

import redis

from trainer_store.records import compact_json, text

Accelerator = Literal["cpu", "gpu"]
# Live workers' hostnames scored by when their entry expires (Unix seconds); the set itself expires
# with the last renewal, so a machine that stops every worker leaves nothing behind.
WORKERS_KEY = "trainer:workers"
# How long a queue seen live is taken as live without reading the registry again. A dead worker's entry
# outlives it by its TTL (seconds) anyway; this spares an admitted run two Redis round trips.
LIVE_QUEUES_FRESH_S = 2.0


def worker_key(hostname: str) -> str:
    """One worker's entry (JSON), with an expiry its main process renews."""
    return f"trainer:workers:{hostname}"


@dataclass(frozen=True)
class WorkerEntry:
    hostname: str  # Celery's node name, e.g. training@machine-1
    host: str  # the machine
    queues: list[str]
    concurrency: int
    accelerator: Accelerator
    devices: int
    pid: int
    # torch threads each pool process trains with: the worker's share of the machine's cores.
    torch_threads: int = 1
    last_seen: float = 0.0


def parse_entry(raw: str | bytes) -> WorkerEntry | None:
    """An entry read back from Redis; None for anything that is not one (written by another version)."""
    try:
        data: object = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    hostname, host, queues = data.get("hostname"), data.get("host"), data.get("queues")
    accelerator, last_seen = data.get("accelerator"), data.get("last_seen")
    numbers = {name: data.get(name) for name in ("concurrency", "devices", "pid", "torch_threads")}
    counts = {name: value for name, value in numbers.items() if isinstance(value, int)}
    if (
        not isinstance(hostname, str)
        or not isinstance(host, str)
        or not isinstance(queues, list)
        or not isinstance(last_seen, (int, float))
        or len(counts) != len(numbers)
    ):
        return None
    return WorkerEntry(
        hostname=hostname,
        host=host,
        queues=[str(queue) for queue in queues],
        concurrency=counts["concurrency"],
        accelerator="gpu" if accelerator == "gpu" else "cpu",
        devices=counts["devices"],
        pid=counts["pid"],
        torch_threads=counts["torch_threads"],
        last_seen=float(last_seen),
    )


class WorkerRegistry:
    """Entries written by each worker's main process; read by the API (GET /queues, admitting a run)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def register(self, entry: WorkerEntry, ttl_s: float, now: float) -> None:
        """Write or renew the entry; it lasts ttl_s unless renewed again."""
        expires = now + ttl_s
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(worker_key(entry.hostname), compact_json(asdict(entry)), px=int(ttl_s * 1000))
            pipe.zadd(WORKERS_KEY, {entry.hostname: expires})
            pipe.zremrangebyscore(WORKERS_KEY, "-inf", now)
            # Every worker renews with the same lifetime, so the latest renewal holds the latest expiry.
            pipe.expire(WORKERS_KEY, int(ttl_s) + 1)
            pipe.execute()

    def unregister(self, hostname: str) -> None:
        """A worker shutting down leaves at once rather than when its entry would expire."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(worker_key(hostname))
            pipe.zrem(WORKERS_KEY, hostname)
            pipe.execute()

    def live(self, now: float) -> list[WorkerEntry]:
        """Workers whose entry has not expired, by hostname."""
        hostnames = [text(name) for name in self._redis.zrangebyscore(WORKERS_KEY, now, "+inf")]
        if not hostnames:
            return []
        raws = self._redis.mget([worker_key(name) for name in hostnames])
        entries = [parse_entry(raw) for raw in raws if isinstance(raw, (str, bytes))]
        return sorted((entry for entry in entries if entry is not None), key=lambda entry: entry.hostname)

    def live_queues(self, now: float) -> list[str]:
        """The queues at least one live worker consumes, sorted."""
        return sorted({queue for entry in self.live(now) for queue in entry.queues})


class LiveQueues:
    """The registry's live queues as a request needs them: a queue seen live within `fresh_s` is answered
    from that read; any other queue reads the registry again, so a worker that just started counts at once."""

    def __init__(self, registry: WorkerRegistry, fresh_s: float = LIVE_QUEUES_FRESH_S) -> None:
        self._registry = registry
        self._fresh_s = fresh_s
        # One tuple, replaced whole: threads of one process read and write it without a lock.
        self._seen: tuple[float, list[str]] = (float("-inf"), [])

    def including(self, queue: str, now: float) -> list[str]:
        """The live queues, read again unless `queue` was among them in a read within fresh_s of `now`."""
        read_at, queues = self._seen
        if queue in queues and now - read_at < self._fresh_s:
            return queues
        queues = self._registry.live_queues(now)
        self._seen = (now, queues)
        return queues
