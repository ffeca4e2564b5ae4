"""Shared fixtures: a private Redis for the session, a clean database per test, API clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from schemas.settings import Settings
from scripts import devstack
from trainer_api import create_app
from trainer_tasks.app import TRAIN_TASK


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service, url = devstack.start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    service.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


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
        corpus_root=corpus_root,
        artifacts_root=tmp_path / "artifacts",
        runs_root=tmp_path / "runs",
        logs_root=tmp_path / "logs",
    )


class DispatchRecorder:
    """Stands in for Celery's send_task in API-only tests; records what would be queued."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], str]] = []

    def __call__(self, name: str, args: list[str], task_id: str) -> None:
        self.calls.append((name, args, task_id))

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
