"""Shared fixtures: a private Redis for the session, a clean database per test, API clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery
from celery.app.task import Task as CeleryTask
from flask import Flask
from flask.testing import FlaskClient

from schemas.events import EVENTS_CHANNEL
from scripts import corpus, devstack
from trainer_api import create_app
from trainer_api.services import Task
from trainer_store.settings import Settings
from trainer_tasks import tasks
from trainer_tasks.app import TRAIN_TASK


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service, url = devstack.start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    service.stop()


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "trainer-test",
    "AWS_SECRET_ACCESS_KEY": "trainer-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-protocol server (moto) for the session; each test that uses it makes its own bucket."""
    service, url = devstack.start_object_store(tmp_path_factory.mktemp("s3"))
    yield url
    service.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The variables a process needs to reach the test's S3 server, set for this process too."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, **S3_CREDENTIALS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def refusing_s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-protocol server that checks credentials and knows none: every request is refused (403)."""
    service, url = devstack.start_object_store(tmp_path_factory.mktemp("s3-refusing"), check_credentials=True)
    yield url
    service.stop()


@pytest.fixture
def wrong_credentials(refusing_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process reaches a store with credentials it refuses; answers the store's endpoint."""
    for name, value in {"AWS_ENDPOINT_URL": refusing_s3_endpoint, **S3_CREDENTIALS}.items():
        monkeypatch.setenv(name, value)
    return refusing_s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A new, empty bucket on the test's S3 server; answers its s3:// URL."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    requests.put(f"{s3_env['AWS_ENDPOINT_URL']}/{name}", timeout=10).raise_for_status()
    return f"s3://{name}"


@dataclass(frozen=True)
class Stack:
    """The real processes: API under gunicorn, a training worker and a light worker, on their own Redis db."""

    api_url: str
    redis_url: str
    corpus_root: Path
    artifacts_root: Path
    worker: devstack.Service
    worker_cwd: Path
    env: dict[str, str]


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Database 1: the per-test flush of database 0 must not drop the Celery queues under a live worker.
    stack_redis_url = redis_url.rsplit("/", 1)[0] + "/1"
    root = tmp_path_factory.mktemp("stack")
    corpus.write(root / "corpora" / "stories.txt", sentences=1200, seed=3)
    corpus.write(root / "corpora" / "tiny.txt", sentences=2, seed=3)
    env = {
        **devstack.stack_env(stack_redis_url, root),
        "APP__MAINTENANCE_INTERVAL_S": "0.5",
        "APP__PROGRESS_INTERVAL_S": "0.2",
        "APP__HEARTBEAT_INTERVAL_S": "0.5",
        "APP__STREAM_KEEPALIVE_S": "1",
        "SECURITY__LINK_SECRET": "stack-link-secret",
        "WEB_CONCURRENCY": "1",
        "LIGHT_CONCURRENCY": "1",
    }
    worker_cwd = root / "worker-cwd"
    worker_cwd.mkdir()
    logs = root / "logs"
    worker = devstack.start_worker(env, logs, name="training", cwd=worker_cwd)
    light = devstack.start_worker(env, logs, name="light", line="light_worker")
    web, api_url = devstack.start_web(env, logs)
    yield Stack(api_url, stack_redis_url, root / "corpora", root / "artifacts", worker, worker_cwd, env)
    for service in (web, light, worker):
        service.stop()


@pytest.fixture
def subscriber(stack: Stack) -> Iterator[redis.client.PubSub]:
    client = redis.Redis.from_url(stack.redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(EVENTS_CHANNEL)
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    yield pubsub
    pubsub.close()
    client.close()


def celery_on(url: str) -> Celery[CeleryTask[[], object]]:
    """A Celery app configured as the API's, sending to the broker at `url` (a test's own Redis)."""
    broker: Celery[CeleryTask[[], object]] = Celery("trainer-test")
    broker.config_from_object("celeryconfig")
    broker.conf.update(broker_url=url, result_backend=url)
    return broker


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """The environment a worker process reads, with the per-process services rebuilt from it."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("APP__RUNS_ROOT", str(tmp_path / "env-runs"))
    monkeypatch.setenv("APP__ARTIFACTS_ROOT", str(tmp_path / "env-artifacts"))
    monkeypatch.setenv("APP__CORPUS_ROOT", str(tmp_path))
    monkeypatch.setenv("APP__CACHE_ROOT", str(tmp_path / "env-cache"))
    monkeypatch.setenv("APP__LEASE_S", "42")
    monkeypatch.setenv("APP__EVENTS_STREAM_MAXLEN", "123")
    tasks.worker_services.cache_clear()
    yield tmp_path
    tasks.worker_services.cache_clear()


@pytest.fixture
def corpus_root(tmp_path: Path) -> Path:
    root = tmp_path / "corpora"
    root.mkdir()
    (root / "notes.txt").write_text("the cat sat on the mat.\n" * 50)
    return root


@pytest.fixture
def settings(redis_url: str, corpus_root: Path, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        corpus_root=str(corpus_root),
        artifacts_root=str(tmp_path / "artifacts"),
        runs_root=str(tmp_path / "runs"),
        cache_root=tmp_path / "cache",
        # The app these tests build sends its tasks to a recorder: no worker ever registers a queue.
        allow_offline_queues=True,
    )


class DispatchRecorder:
    """Stands in for Celery's send_task in API-only tests; records what would be queued."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def __call__(self, task: Task) -> None:
        self.tasks.append(task)

    @property
    def calls(self) -> list[tuple[str, list[str], str]]:
        """Everything sent, as (task name, arguments, task id)."""
        return [(task.name, task.args, task.task_id) for task in self.tasks]

    @property
    def sent(self) -> list[tuple[str, str]]:
        """Training runs queued, as (run_id, job_id)."""
        return [(args[0], task_id) for name, args, task_id in self.calls if name == TRAIN_TASK]


@pytest.fixture
def dispatched() -> DispatchRecorder:
    return DispatchRecorder()


@pytest.fixture
def app(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Flask:
    return create_app(settings, dispatch=dispatched)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
