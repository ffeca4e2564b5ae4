"""The worker registry: entries that expire unless renewed, GET /queues, and runs only for live queues."""

from __future__ import annotations

import logging
import socket
import time
import types
from dataclasses import replace

import pytest
import redis
import requests
from flask.testing import FlaskClient

from schemas.queues import broker_lists
from scripts import devstack
from tests.conftest import DispatchRecorder, Stack
from tests.test_api import field_errors, json_of, submit, valid_body
from trainer_api import create_app
from trainer_store.settings import Settings
from trainer_store.workers import (
    WORKERS_KEY,
    LiveQueues,
    WorkerEntry,
    WorkerRegistry,
    parse_entry,
    worker_key,
)
from trainer_tasks import resources
from trainer_tasks.app import celery_app
from trainer_tasks.registry import (
    Registration,
    RegistryStep,
    describe,
    for_worker,
    thread_share,
    threads_of,
)


def entry(hostname: str, queues: list[str], host: str = "box-1", concurrency: int = 1) -> WorkerEntry:
    return WorkerEntry(
        hostname=hostname,
        host=host,
        queues=queues,
        concurrency=concurrency,
        accelerator="cpu",
        devices=1,
        pid=7,
    )


def test_an_entry_lives_until_it_expires_unless_renewed(redis_client: redis.Redis) -> None:
    registry = WorkerRegistry(redis_client)
    registry.register(entry("training@a", ["training"]), ttl_s=30, now=100.0)
    registry.register(entry("gpu@b", ["gpu", "training"]), ttl_s=30, now=110.0)
    assert [found.hostname for found in registry.live(now=120.0)] == ["gpu@b", "training@a"]
    assert registry.live_queues(now=120.0) == ["gpu", "training"]
    # a@100 expired at 130 without a renewal; b lives until 140
    assert [found.hostname for found in registry.live(now=135.0)] == ["gpu@b"]
    assert 0 < redis_client.pttl(worker_key("gpu@b")) <= 30_000
    assert 0 < redis_client.ttl(WORKERS_KEY) <= 31
    registry.unregister("gpu@b")
    assert registry.live(now=120.0) == [entry_for(registry, "training@a", 120.0)]
    assert not redis_client.exists(worker_key("gpu@b"))


def entry_for(registry: WorkerRegistry, hostname: str, now: float) -> WorkerEntry:
    return next(found for found in registry.live(now) if found.hostname == hostname)


def test_an_entry_whose_key_is_gone_or_unreadable_is_not_listed(redis_client: redis.Redis) -> None:
    registry = WorkerRegistry(redis_client)
    registry.register(entry("training@a", ["training"]), ttl_s=30, now=100.0)
    registry.register(entry("odd@b", ["odd"]), ttl_s=30, now=100.0)
    redis_client.set(worker_key("odd@b"), '{"hostname": "odd@b"}')
    redis_client.zadd(WORKERS_KEY, {"gone@c": 200.0})
    assert [found.hostname for found in registry.live(now=101.0)] == ["training@a"]
    assert registry.live(now=500.0) == []
    for raw in ("not json", "[1]", '{"hostname": 1}'):
        assert parse_entry(raw) is None


def test_each_worker_takes_its_share_of_the_host_cores() -> None:
    me = entry("training@a", ["training"], concurrency=1)
    others = [
        entry("light@a", ["light"], concurrency=2),
        entry("gpu@b", ["gpu"], host="box-2", concurrency=4),
        me,  # its own old entry does not count twice
    ]
    assert thread_share(8, me, others) == 8 // 3
    assert thread_share(2, me, others) == 1  # never below one thread
    assert thread_share(8, me, []) == 8


def test_a_registration_renews_writes_its_threads_and_leaves_at_stop(
    redis_client: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = WorkerRegistry(redis_client)
    registry.register(entry("light@box-1", ["light"], concurrency=3), ttl_s=60, now=1000.0)
    clock = iter([1000.0, 1001.0])
    me = Registration(
        registry, entry("training@box-1", ["training"]), 0.3, cores=8, clock=lambda: next(clock)
    )
    me.start()
    assert entry_for(registry, "training@box-1", 1000.0).torch_threads == 2  # 8 cores over 3 + 1 processes
    me.stop()  # the renewal thread stops, the entry goes
    assert [found.hostname for found in registry.live(1000.0)] == ["light@box-1"]
    # A pool process trains with the threads its worker's entry gives it; all cores when it has none.
    assert threads_of(registry, "light@box-1", 1000.0) == 1
    assert threads_of(registry, "nobody@box-1", 1000.0) == resources.available_cpus()
    never_started = Registration(registry, entry("x@box-1", ["x"]), 30, cores=8, fixed_threads=5)
    assert never_started.renew_once()
    assert never_started.entry.torch_threads == 5
    never_started.stop()

    unreachable = redis.Redis.from_url(f"redis://127.0.0.1:{devstack.free_port()}/0")
    away = Registration(WorkerRegistry(unreachable), entry("y@box-1", ["y"]), 30, cores=8)
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.registry"):
        assert not away.renew_once()
        away.stop()
        assert threads_of(WorkerRegistry(unreachable), "y@box-1", 1.0) == resources.available_cpus()
    assert "worker registry entry not renewed" in caplog.text
    assert "worker registry entry not removed (it expires by itself)" in caplog.text
    assert "worker registry not read; training on every core" in caplog.text


class Controller:
    """The parts of Celery's WorkController the step reads (a real one is built by the stack's workers)."""

    def __init__(self, hostname: str, concurrency: int, queues: list[str]) -> None:
        self.hostname, self.concurrency = hostname, concurrency
        self.app = types.SimpleNamespace(
            amqp=types.SimpleNamespace(queues=types.SimpleNamespace(consume_from=dict.fromkeys(queues)))
        )


def test_a_worker_describes_itself_from_its_controller_and_environment(redis_url: str) -> None:
    controller = Controller("gpu@box-9", 2, ["training", "gpu"])
    env = {
        "REDIS_URL": redis_url,
        "WORKER_ACCELERATOR": "GPU",
        "WORKER_DEVICES": "4",
        "APP__WORKER_TTL_S": "9",
    }
    described = describe(controller, env)
    assert (described.hostname, described.queues, described.concurrency) == (
        "gpu@box-9",
        ["gpu", "training"],
        2,
    )
    assert (described.host, described.accelerator, described.devices) == (socket.gethostname(), "gpu", 4)
    built = for_worker(controller, {**env, "WORKER_TORCH_THREADS": "3"})
    assert built.ttl_s == 9.0
    assert built.renew_once()
    assert built.entry.torch_threads == 3
    assert describe(controller, {}).accelerator == "cpu"
    with pytest.raises(TypeError, match="needs a Celery worker controller"):
        describe(object(), env)
    assert RegistryStep in celery_app.steps["worker"]
    RegistryStep(controller).stop(controller)  # stopped before it started: nothing to remove


def strict(settings: Settings) -> FlaskClient:
    return create_app(
        replace(settings, allow_offline_queues=False), dispatch=DispatchRecorder()
    ).test_client()


def test_a_run_for_a_queue_no_live_worker_consumes_is_refused_naming_the_live_ones(
    settings: Settings, redis_client: redis.Redis
) -> None:
    client = strict(settings)
    refused = submit(client, valid_body())
    assert refused.status_code == 422
    assert field_errors(refused)["queue"] == ["no live worker consumes queue 'training'; live queues: none"]
    registry = WorkerRegistry(redis_client)
    registry.register(entry("light@a", ["light"]), ttl_s=60, now=time.time())
    registry.register(entry("gpu@b", ["gpu"]), ttl_s=60, now=time.time())
    assert field_errors(submit(client, valid_body()))["queue"] == [
        "no live worker consumes queue 'training'; live queues: gpu"
    ]
    assert submit(client, valid_body(queue="gpu")).status_code == 202


def test_a_queue_seen_live_is_taken_as_live_for_a_moment_and_any_other_is_read_again(
    redis_client: redis.Redis,
) -> None:
    registry = WorkerRegistry(redis_client)
    live = LiveQueues(registry, fresh_s=2.0)
    registry.register(entry("training@a", ["training"]), ttl_s=60, now=100.0)
    assert live.including("training", now=100.0) == ["training"]
    registry.unregister("training@a")
    # Within the moment the earlier read stands; after it the registry is read again.
    assert live.including("training", now=101.5) == ["training"]
    assert live.including("training", now=102.0) == []
    # A queue missing from the last read is never taken from it: a worker that just started counts at once.
    registry.register(entry("gpu@b", ["gpu"]), ttl_s=60, now=102.1)
    assert live.including("gpu", now=102.1) == ["gpu"]


def test_get_queues_lists_live_queues_with_workers_and_broker_lengths(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    assert listed_queues(json_of(client.get("/queues"))) == []
    registry = WorkerRegistry(redis_client)
    registry.register(entry("training@a", ["training"], concurrency=2), ttl_s=60, now=time.time())
    registry.register(entry("gpu@b", ["gpu", "training"]), ttl_s=60, now=time.time())
    first, resumed = broker_lists("training")[0], broker_lists("training")[2]
    redis_client.rpush(first, "m1")
    redis_client.rpush(resumed, "m2", "m3")
    queues = listed_queues(json_of(client.get("/queues")))
    assert [(queue["name"], queue["length"]) for queue in queues] == [("gpu", 0), ("training", 3)]
    workers = queues[1]["workers"]
    assert isinstance(workers, list)
    assert [(worker["hostname"], worker["concurrency"]) for worker in workers] == [
        ("gpu@b", 1),
        ("training@a", 2),
    ]


def listed_queues(body: dict[str, object]) -> list[dict[str, object]]:
    queues = body["queues"]
    assert isinstance(queues, list)
    assert all(isinstance(queue, dict) for queue in queues)
    return [{str(key): value for key, value in queue.items()} for queue in queues]


def test_the_stack_workers_register_and_are_listed(stack: Stack) -> None:
    body = requests.get(f"{stack.api_url}/queues", timeout=10).json()
    by_name = {queue["name"]: queue for queue in body["queues"]}
    assert set(by_name) >= {"training", "light"}
    worker = by_name["training"]["workers"][0]
    assert worker["hostname"].startswith("training@")
    assert worker["queues"] == ["training"]
    assert (worker["accelerator"], worker["devices"], worker["concurrency"]) == ("cpu", 1, 1)
    assert worker["torch_threads"] >= 1
