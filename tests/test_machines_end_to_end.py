"""Each process on a machine of its own: the API, the workers and the bot share only Redis and the store.

Every process gets its own working directory, cache and temporary folder (no folder is shared by any
two of them); the three roots are on the S3 server. A corpus is uploaded, a tokenizer trained, a run
trained on both, its logs followed, its artifacts listed and downloaded, it is evaluated on the light
worker and the bot's completed DM carries the loss curve. Then a run is handed back with SIGTERM and
another worker, with a cache of its own, resumes it from the checkpoint in the store.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
import torch

from schemas.events import EVENTS_STREAM, TrainProgress
from scripts import corpus, devstack
from tests.conftest import S3_CREDENTIALS
from tests.streams import sent_events
from tests.test_engine_end_to_end import get_json, poll, post_json
from tests.test_shutdown_end_to_end import step
from trainer_store.runs import RunStore
from trainer_store.storage import Storage

SNOWFLAKE = 123456789012345678
BOT_GROUP = "trainer-bot"


@dataclass(frozen=True)
class Machine:
    """A folder standing for one machine: the process's working directory, cache and temporary files."""

    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    def env(self, shared: dict[str, str]) -> dict[str, str]:
        for folder in (self.cwd, self.root / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            **shared,
            "APP__CACHE_ROOT": str(self.root / "cache"),
            "TMPDIR": str(self.root / "tmp"),
            "HOME": str(self.root),
        }


@dataclass(frozen=True)
class Cluster:
    api_url: str
    redis: redis.Redis
    store: RunStore
    shared: dict[str, str]
    artifacts: Storage
    runs: Storage
    machines: dict[str, Machine]
    services: dict[str, devstack.Service]
    logs: Path


@pytest.fixture(scope="module")
def cluster(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("machines")
    bucket = f"machines-{uuid.uuid4().hex[:12]}"
    requests.put(f"{s3_endpoint}/{bucket}", timeout=10).raise_for_status()
    s3_env = {"AWS_ENDPOINT_URL": s3_endpoint, **S3_CREDENTIALS}
    url = redis_url.rsplit("/", 1)[0] + "/3"  # a database of its own: no other test's worker takes its runs
    client = redis.Redis.from_url(url)
    client.flushdb()
    shared = {
        **devstack.stack_env(url, f"s3://{bucket}", base={**os.environ, **s3_env}),
        "APP__PROGRESS_INTERVAL_S": "0.2",
        "APP__HEARTBEAT_INTERVAL_S": "0.5",
        "WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "2",
        "WEB_CONCURRENCY": "1",
        "LIGHT_CONCURRENCY": "1",
    }
    machines = {name: Machine(root / name) for name in ("api", "worker-a", "worker-b", "light", "bot")}
    logs = root / "logs"
    services: dict[str, devstack.Service] = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_env.items():
            patch.setenv(name, value)  # this process reads the store too, to check what is there
        try:
            # Started together, waited for in turn: the workers take seconds each to import torch.
            for name, line in (("worker-a", "worker"), ("light", "light_worker")):
                env = {**machines[name].env(shared), "WORKER_NAME": name}
                services[name] = devstack.start_procfile(line, env, logs, cwd=machines[name].cwd, name=name)
            api_env = machines["api"].env(shared)
            services["api"], api_url = devstack.start_web(api_env, logs, machines["api"].cwd)
            bot_env = {
                **machines["bot"].env(shared),
                "TRAINER_API_URL": api_url,
                "PYTHONUNBUFFERED": "1",  # each DM reaches the console log as it is printed
            }
            services["bot"] = devstack.start_procfile("bot", bot_env, logs, cwd=machines["bot"].cwd)
            for name in ("worker-a", "light"):
                devstack.wait_ready(services[name], devstack.worker_ready(services[name]), 120)
            devstack.wait_ready(services["bot"], lambda: bot_group_exists(client), 60)
            yield Cluster(
                api_url,
                client,
                RunStore(client),
                shared,
                Storage(f"s3://{bucket}/artifacts"),
                Storage(f"s3://{bucket}/runs"),
                machines,
                services,
                logs,
            )
        finally:
            for service in reversed(services.values()):
                service.stop()
            client.flushdb()
            client.close()


def bot_group_exists(client: redis.Redis) -> bool:
    try:
        groups = client.xinfo_groups(EVENTS_STREAM)
    except redis.ResponseError:  # no stream yet
        return False
    return any(group.get("name") in (BOT_GROUP, BOT_GROUP.encode()) for group in groups)


class Follower(threading.Thread):
    """GET /runs/{id}/logs/stream from before the run starts to its `event: end`."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.text = ""

    def run(self) -> None:
        with requests.get(self.url, stream=True, timeout=(10, 60)) as response:
            for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
                self.text += chunk


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_processes_on_separate_machines_share_only_redis_and_the_store(cluster: Cluster) -> None:
    api = cluster.api_url
    text = corpus.generate(1200, seed=21)
    uploaded = requests.post(
        f"{api}/corpora", files={"file": ("stories.txt", text.encode(), "text/plain")}, timeout=30
    )
    assert uploaded.status_code == 201, uploaded.text
    corpus_id = uploaded.json()["corpus_id"]

    accepted = post_json(f"{api}/tokenizers/train", {"corpus_id": corpus_id, "vocab_size": 600})
    tokenizer = poll(lambda: get_json(f"{api}/tokenizers/{accepted['tokenizer_id']}"))
    assert tokenizer["status"] == "completed", tokenizer
    assert tokenizer["artifact_path"] == f"{cluster.artifacts.root}/tokenizers/{accepted['tokenizer_id']}"

    run_id = str(
        post_json(
            f"{api}/runs/train",
            {
                "corpus_id": corpus_id,
                "tokenizer_id": accepted["tokenizer_id"],
                "model_size": "tiny",
                "max_seq_len": 32,
                "batch_size": 8,
                "num_epochs": 2,
                "user_id": SNOWFLAKE,
            },
        )["run_id"]
    )
    follower = Follower(f"{api}/runs/{run_id}/logs/stream?tail=10000")
    follower.start()
    status = poll(lambda: get_json(f"{api}/runs/{run_id}"))
    assert status["status"] == "completed", status
    assert status["artifact_path"] == f"{cluster.artifacts.root}/models/{run_id}"

    # Logs, served from Redis: the tail, and the stream followed from the start to the end.
    tail = requests.get(f"{api}/runs/{run_id}/logs?tail=10000", timeout=10).text
    assert "trainer.train.completed.v1" in tail
    follower.join(60)
    assert follower.text.endswith("event: end\ndata: \n\n")
    assert "trainer.train.started.v1" in follower.text
    assert "trainer.train.completed.v1" in follower.text

    # Artifacts: listed once whole, streamed from the store, a range as asked.
    files = get_json(f"{api}/runs/{run_id}/artifact")["files"]
    assert isinstance(files, list)
    names = {entry["name"] for entry in files}
    assert {"manifest.json", "model.safetensors", "loss_curve.png", "logs.jsonl", "tokenizer.json"} <= names
    stored = cluster.artifacts.read_bytes(f"models/{run_id}/model.safetensors")
    part = requests.get(
        f"{api}/runs/{run_id}/artifact/model.safetensors", headers={"Range": "bytes=100-4195"}, timeout=30
    )
    assert part.status_code == 206
    assert part.content == stored[100:4196]
    assert requests.get(f"{api}/runs/{run_id}/artifact/model.safetensors", timeout=30).content == stored

    # Evaluated on the light worker, from the files in the store.
    post_json(f"{api}/runs/{run_id}/evaluate", {"split": "validation"})
    evaluation = poll(lambda: get_json(f"{api}/runs/{run_id}/eval"))
    assert evaluation["status"] == "completed", evaluation
    assert isinstance(evaluation["loss"], float)

    # The bot read the loss curve through the API and attached it to the completed DM.
    curve = cluster.artifacts.size(f"models/{run_id}/loss_curve.png")
    bot = cluster.services["bot"]
    devstack.wait_until(lambda: f"[attached loss_curve.png, {curve:,} bytes]" in bot.log(), 60, "the DM")

    # Nothing went through a folder: each machine holds only its own cache, and no process wrote to
    # another's. The training worker downloaded the corpus and tokenizer; the light worker the model.
    # The API keeps only its own Prometheus samples (gunicornconfig.py), which no other process reads.
    api_files = files_under(cluster.machines["api"].root)
    assert [name for name in api_files if not name.startswith("tmp/trainer-metrics-")] == []
    assert files_under(cluster.machines["bot"].root) == []
    assert len(files_under(cluster.machines["worker-a"].root / "cache" / "objects")) == 2
    assert len(files_under(cluster.machines["light"].root / "cache" / "objects")) >= 4
    for name in ("worker-a", "light"):
        assert files_under(cluster.machines[name].root / "cache" / "work") == []
        assert files_under(cluster.machines[name].cwd) == []


def test_a_run_handed_back_with_sigterm_resumes_on_another_machine_from_the_stored_checkpoint(
    cluster: Cluster,
) -> None:
    api = cluster.api_url
    uploaded = requests.post(
        f"{api}/corpora",
        files={"file": ("long.txt", corpus.generate(3000, seed=5).encode(), "text/plain")},
        timeout=30,
    )
    corpus_id = uploaded.json()["corpus_id"]
    body = {"corpus_id": corpus_id, "model_size": "tiny", "max_seq_len": 32, "batch_size": 8}
    run_id = str(post_json(f"{api}/runs/train", {**body, "num_epochs": 20, "user_id": 7})["run_id"])
    devstack.wait_until(
        lambda: (record := cluster.store.get(run_id)) is not None and step(record) >= 40, 180, "40 steps"
    )

    first = cluster.services["worker-a"]
    os.kill(first.process.pid, signal.SIGTERM)  # the Celery master only, as a platform stops a machine
    assert first.process.wait(60) == 0
    requeued = cluster.store.get(run_id)
    assert requeued is not None
    assert (requeued.status, requeued.message, requeued.attempt) == (
        "queued",
        "requeued after a worker shutdown",
        0,
    )
    # last.ckpt reached the store before the run went back to the queue.
    checkpoint = cluster.logs / "inspected.ckpt"  # read here, by the test: no machine's folder
    cluster.runs.download(f"{run_id}/checkpoints/last.ckpt", checkpoint)
    saved_step = torch.load(checkpoint, weights_only=False)["global_step"]
    checkpoint.unlink()
    assert saved_step >= 40

    machine = cluster.machines["worker-b"]
    second = devstack.start_worker(
        {**machine.env(cluster.shared), "WORKER_NAME": "worker-b"}, cluster.logs, "worker-b", machine.cwd
    )
    cluster.services["worker-b"] = second
    devstack.wait_until(
        lambda: (cluster.store.get(run_id) or requeued).last_seq > requeued.last_seq + 1, 180, "the resume"
    )
    resumed = cluster.store.get(run_id)
    assert resumed is not None
    assert resumed.attempt == 1
    new_progress = [
        event
        for event in sent_events(cluster.redis)
        if isinstance(event, TrainProgress)
        and event.run_id == run_id
        and (event.seq or 0) > requeued.last_seq
    ]
    assert new_progress[0].step > saved_step
    tail = requests.get(f"{api}/runs/{run_id}/logs?tail=10000", timeout=10).text
    assert "resuming from the run's last checkpoint in the store" in tail
    assert requests.post(f"{api}/runs/{run_id}/cancel", timeout=10).status_code == 202
    assert poll(lambda: get_json(f"{api}/runs/{run_id}"))["status"] == "canceled"
