"""Two training workers on two queues and the light worker: each run trains once, on a worker of its queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests

from schemas.events import TrainCompleted, TrainEvent, TrainStarted
from scripts import corpus, devstack
from tests.conftest import Stack
from tests.streams import events_through_the_end, sent_events

QUEUES = {"training": "alpha", "second": "beta"}  # queue -> the name of the worker that consumes it
RUNS_PER_QUEUE = 3


@dataclass(frozen=True)
class Cluster:
    api_url: str
    client: redis.Redis
    workers: dict[str, devstack.Service]


@pytest.fixture
def cluster(stack: Stack, tmp_path: Path) -> Iterator[Cluster]:
    # A database of its own, so that only these workers consume these queues.
    redis_url = stack.redis_url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = {
        **devstack.stack_env(redis_url, tmp_path, base=stack.env),
        # One thread each: two trainings share this machine's cores.
        "WORKER_TORCH_THREADS": "1",
    }
    corpus.write(tmp_path / "corpora" / "short.txt", sentences=400, seed=5)
    logs = tmp_path / "logs"
    services: dict[str, devstack.Service] = {}
    try:
        services["alpha"] = devstack.start_procfile(
            "worker", {**env, "WORKER_NAME": "alpha"}, logs, name="alpha"
        )
        # An operator's second training queue: the worker line with another --queues.
        argv = ["celery", "--app", "trainer_tasks.app", "worker", "--queues", "second", "--concurrency", "1"]
        argv += ["--loglevel", "INFO"]
        services["beta"] = devstack.start("beta", [*argv, "--hostname", "beta@%h"], env, logs)
        services["light"] = devstack.start_procfile("light_worker", {**env, "WORKER_NAME": "light"}, logs)
        for service in services.values():
            devstack.wait_ready(service, devstack.worker_ready(service), 120)
        web, api_url = devstack.start_web(env, logs)
        services["web"] = web
        yield Cluster(api_url, client, services)
    finally:
        for service in reversed(services.values()):
            service.stop()
        client.flushdb()
        client.close()


def submit(cluster: Cluster, queue: str) -> str:
    body = {
        "corpus_path": "short.txt",
        "user_id": 0,
        "model_size": "tiny",
        "max_seq_len": 32,
        "batch_size": 8,
        "num_epochs": 1,
        "queue": queue,
        "accelerator": "cpu",
    }
    response = requests.post(f"{cluster.api_url}/runs/train", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["run_id"])


def status_of(cluster: Cluster, run_id: str) -> dict[str, object]:
    body = requests.get(f"{cluster.api_url}/runs/{run_id}", timeout=10).json()
    assert isinstance(body, dict)
    return {str(key): value for key, value in body.items()}


def events_by_run(client: redis.Redis) -> dict[str, list[TrainEvent]]:
    found: dict[str, list[TrainEvent]] = {}
    for event in sent_events(client):
        found.setdefault(event.run_id, []).append(event)
    return found


def test_runs_on_two_queues_train_once_each_on_their_queues_workers_as_positions_count_down(
    cluster: Cluster,
) -> None:
    listed = requests.get(f"{cluster.api_url}/queues", timeout=10).json()["queues"]
    assert {queue["name"]: [w["hostname"].split("@")[0] for w in queue["workers"]] for queue in listed} == {
        "training": ["alpha"],
        "second": ["beta"],
        "light": ["light"],
    }
    runs = {queue: [submit(cluster, queue) for _ in range(RUNS_PER_QUEUE)] for queue in QUEUES}

    # Each queued run's place, read until it has left the queue: it only ever moves forward.
    seen: dict[str, list[int]] = {run_id: [] for ids in runs.values() for run_id in ids}
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + 600
    while len(statuses) < len(seen) and time.monotonic() < deadline:
        for run_id, places in seen.items():
            if run_id in statuses:
                continue
            body = status_of(cluster, run_id)
            position = body["queue_position"]
            if isinstance(position, int):
                places.append(position)
            if body["status"] in ("completed", "failed", "canceled"):
                statuses[run_id] = str(body["status"])
        time.sleep(0.2)
    assert set(statuses.values()) == {"completed"}, statuses
    for queue, ids in runs.items():
        last = seen[ids[-1]]
        assert last, f"the last run on {queue} was seen queued"
        assert last[0] >= 2, f"the last run on {queue} had runs ahead of it: {last}"
        assert 1 in last, f"the last run on {queue} became the next one: {last}"
        for run_id in ids:
            assert seen[run_id] == sorted(seen[run_id], reverse=True), seen[run_id]

    for ids in runs.values():
        for run_id in ids:
            events_through_the_end(cluster.client, run_id)  # each record ends before its event is sent
    events = events_by_run(cluster.client)
    for queue, ids in runs.items():
        worker = QUEUES[queue]
        for run_id in ids:
            body = status_of(cluster, run_id)
            assert (body["queue"], body["attempt"]) == (queue, 1)
            assert str(body["worker"]).startswith(f"{worker}@")
            ran = events[run_id]
            assert [event.seq for event in ran] == list(range(1, len(ran) + 1))
            started, completed = ran[0], ran[-1]
            assert isinstance(started, TrainStarted)
            assert isinstance(completed, TrainCompleted)
            assert sum(isinstance(event, TrainStarted) for event in ran) == 1
            assert (started.queue, started.worker, started.torch_threads) == (queue, body["worker"], 1)
            # Executed once: one task succeeded for it, in its own worker's log only.
            job = f"Task trainer.train[{body['job_id']}] succeeded"
            logs = {name: service.log() for name, service in cluster.workers.items() if name != "web"}
            assert [name for name, text in logs.items() if job in text] == [worker]
            assert logs[worker].count(job) == 1


@pytest.fixture
def threads_worker(stack: Stack, tmp_path: Path) -> Iterator[devstack.Service]:
    """A worker whose pool is threads of its main process, as the gpu_worker line runs it."""
    argv = ["celery", "--app", "trainer_tasks.app", "worker", "--pool", "threads", "--concurrency", "1"]
    argv += ["--queues", "ddp", "--hostname", "ddp@%h", "--loglevel", "INFO"]
    service = devstack.start("ddp", argv, {**stack.env, "WORKER_TORCH_THREADS": "2"}, tmp_path / "logs")
    try:
        devstack.wait_ready(service, devstack.worker_ready(service), 120)
        yield service
    finally:
        service.stop()


def test_two_devices_train_through_a_threads_pool_worker_and_fail_on_a_prefork_one(
    stack: Stack, threads_worker: devstack.Service
) -> None:
    body = {
        "corpus_path": "stories.txt",
        "user_id": 0,
        "model_size": "tiny",
        "max_seq_len": 32,
        "batch_size": 8,
        "num_epochs": 1,
        "accelerator": "cpu",
        "devices": 2,
    }
    runs = {}
    for queue in ("ddp", "training"):
        response = requests.post(f"{stack.api_url}/runs/train", json={**body, "queue": queue}, timeout=10)
        assert response.status_code == 202, response.text
        runs[queue] = str(response.json()["run_id"])
    ended: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 600
    while len(ended) < len(runs) and time.monotonic() < deadline:
        for queue, run_id in runs.items():
            status = requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()
            if status["status"] in ("completed", "failed", "canceled"):
                ended[queue] = status
        time.sleep(0.5)
    assert ended["ddp"]["status"] == "completed", ended["ddp"]
    failed = ended["training"]
    assert (failed["status"], failed["error_kind"]) == ("failed", "user")
    assert "devices=2 needs a worker whose pool may start processes" in str(failed["message"])

    # One started and one completed event for the run, and one model, from rank zero.
    client = redis.Redis.from_url(stack.redis_url)
    events = events_through_the_end(client, runs["ddp"])
    client.close()
    assert [type(event) for event in events].count(TrainStarted) == 1
    assert [type(event) for event in events].count(TrainCompleted) == 1
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    started, completed = events[0], events[-1]
    assert isinstance(started, TrainStarted)
    assert isinstance(completed, TrainCompleted)
    assert (started.devices, started.torch_threads, started.worker) == (2, 1, ended["ddp"]["worker"])
    assert (Path(completed.artifact_path) / "manifest.json").is_file()
    # The task ends once its ranks have exited, after rank zero has recorded the run.
    done = f"Task trainer.train[{ended['ddp']['job_id']}] succeeded"
    devstack.wait_until(lambda: done in threads_worker.log(), 120, "the task's end")
    assert threads_worker.log().count(done) == 1
