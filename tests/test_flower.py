"""Operators watch workers and tasks in Flower, started from the Procfile's `flower` line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests

from scripts import devstack
from tests.conftest import Stack


@pytest.fixture
def flower_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = devstack.free_port()
    env = {**stack.env, "FLOWER_PORT": str(port), "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = devstack.start_procfile("flower", env, tmp_path_factory.mktemp("flower"))
    yield f"http://127.0.0.1:{port}"
    flower.stop()


def eventually(probe: Callable[[], object], timeout_s: float = 60) -> object:
    """The first truthy answer of `probe`, polled until the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = probe()
        except requests.RequestException:
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"nothing after {timeout_s:.0f} s")


def test_flower_shows_the_workers_and_a_finished_training_task(stack: Stack, flower_url: str) -> None:
    def workers() -> list[str]:
        answer: object = requests.get(f"{flower_url}/api/workers?refresh=1", timeout=5).json()
        return sorted(answer) if isinstance(answer, dict) else []

    names = eventually(workers)
    assert isinstance(names, list)
    assert any(name.startswith("training@") for name in names)
    assert any(name.startswith("light@") for name in names)

    body = {"corpus_path": "tiny.txt", "user_id": 0, "model_size": "tiny"}
    job_id = requests.post(f"{stack.api_url}/runs/train", json=body, timeout=10).json()["job_id"]

    def task_state() -> str | None:
        answer: object = requests.get(f"{flower_url}/api/task/info/{job_id}", timeout=5).json()
        state = answer.get("state") if isinstance(answer, dict) else None
        return state if state == "SUCCESS" else None

    assert eventually(task_state) == "SUCCESS"
    info = requests.get(f"{flower_url}/api/task/info/{job_id}", timeout=5).json()
    assert info["name"] == "trainer.train"
