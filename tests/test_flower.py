"""Operators watch workers and tasks in Flower (the Procfile's `flower` line), behind basic auth."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import requests

from scripts import devstack
from tests.conftest import Stack

CREDENTIALS = ("operator", "fl0wer-secret")


def start_flower(stack: Stack, state_dir: Path) -> tuple[devstack.Service, str]:
    port = devstack.free_port()
    env = {
        **stack.env,
        "FLOWER_PORT": str(port),
        "FLOWER_BASIC_AUTH": ":".join(CREDENTIALS),
        "FLOWER_DB": str(state_dir / "flower.db"),
    }
    service = devstack.start_procfile("flower", env, state_dir)
    url = f"http://127.0.0.1:{port}"
    devstack.wait_ready(service, lambda: devstack.http_answers(url), 60)
    return service, url


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


def task_info(url: str, job_id: str) -> dict[str, object] | None:
    info: object = requests.get(f"{url}/api/task/info/{job_id}", auth=CREDENTIALS, timeout=5).json()
    return info if isinstance(info, dict) and info.get("state") == "SUCCESS" else None


def test_flower_asks_for_credentials_then_shows_workers_and_a_run_by_its_id(
    stack: Stack, tmp_path: Path
) -> None:
    flower, url = start_flower(stack, tmp_path)
    try:
        for page in ("/", "/api/workers", "/tasks"):
            assert requests.get(f"{url}{page}", timeout=5).status_code == 401, page
        assert requests.get(f"{url}/api/workers", auth=("operator", "wrong"), timeout=5).status_code == 401

        def workers() -> list[str]:
            answer: object = requests.get(f"{url}/api/workers?refresh=1", auth=CREDENTIALS, timeout=5).json()
            return sorted(answer) if isinstance(answer, dict) else []

        names = eventually(workers)
        assert isinstance(names, list)
        assert any(name.startswith("training@") for name in names)
        assert any(name.startswith("light@") for name in names)

        body = {"corpus_path": "tiny.txt", "user_id": 0, "model_size": "tiny"}
        answer = requests.post(f"{stack.api_url}/runs/train", json=body, timeout=10).json()
        run_id, job_id = answer["run_id"], answer["job_id"]
        info = eventually(lambda: task_info(url, job_id))
        assert isinstance(info, dict)
        assert info["name"] == "trainer.train"
        assert run_id in str(info["args"]), "the run id reads in the task's arguments"

        # The task list has an arguments column, and a run id finds its task.
        assert '<th data-column="args">' in requests.get(f"{url}/tasks", auth=CREDENTIALS, timeout=5).text
        query: dict[str, str | int] = {
            "draw": 1,
            "start": 0,
            "length": 10,
            "search[value]": f"args:{run_id}",
            "order[0][column]": 0,
            "columns[0][data]": "received",
        }
        table = requests.get(f"{url}/tasks/datatable", params=query, auth=CREDENTIALS, timeout=5).json()
        assert [(row["uuid"], row["name"]) for row in table["data"]] == [(job_id, "trainer.train")]
        assert run_id in table["data"][0]["args"]
    finally:
        flower.stop()

    # Its state is kept in a file: a restarted Flower still knows the finished task.
    flower, url = start_flower(stack, tmp_path)
    try:
        assert task_info(url, job_id) is not None
    finally:
        flower.stop()


def test_flower_refuses_to_start_without_credentials(stack: Stack, tmp_path: Path) -> None:
    env = {name: value for name, value in stack.env.items() if name != "FLOWER_BASIC_AUTH"}
    refused = devstack.start_procfile("flower", {**env, "FLOWER_PORT": str(devstack.free_port())}, tmp_path)
    assert refused.process.wait(30) == 2
    assert "FLOWER_BASIC_AUTH: must be set to user:password" in refused.log()
