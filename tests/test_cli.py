"""The `trainer` command as a user runs it: the installed console script against the real stack."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from scripts import corpus, devstack
from tests.conftest import Stack
from trainer_client.client import ServerSentEvent, runs_ahead, server_sent_events
from trainer_store.workers import WorkerEntry, WorkerRegistry

TRAINER = str(Path(sys.executable).parent / "trainer")
TINY = ["--size", "tiny", "--epochs", "1", "--batch-size", "8"]


def trainer(
    stack: Stack, *args: str, api_url: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "TRAINER_API_URL": api_url or stack.api_url, "COLUMNS": "200"}
    return subprocess.run([TRAINER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def run_id_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["run_id"])


def test_a_local_corpus_is_uploaded_trained_on_and_followed_to_the_end(stack: Stack, tmp_path: Path) -> None:
    text = tmp_path / "my-stories.txt"
    corpus.write(text, sentences=600, seed=5)
    queued = trainer(stack, "train", str(text), *TINY, "--seed", "7", "--test-fraction", "0.1")
    assert queued.returncode == 0, queued.stderr
    assert queued.stderr.startswith(f"uploaded {text} as corpus ")
    assert queued.stdout.startswith("run ")
    run_id = queued.stdout.split()[1]

    followed = trainer(stack, "logs", run_id, "-f")
    assert followed.returncode == 0, followed.stderr
    assert "trainer.train.completed.v1" in followed.stdout

    status = trainer(stack, "status", run_id)
    assert status.returncode == 0
    assert "completed" in status.stdout
    assert run_id in status.stdout
    record = json.loads(trainer(stack, "status", run_id, "--json").stdout)
    assert (record["run_id"], record["status"]) == (run_id, "completed")
    assert record["artifact_path"]

    tail = trainer(stack, "logs", run_id, "--tail", "1")
    assert tail.returncode == 0
    assert len(tail.stdout.splitlines()) == 1

    listed = json.loads(trainer(stack, "runs", "--json").stdout)["runs"]
    assert run_id in [run["run_id"] for run in listed], "user 0's runs by default"
    assert run_id in trainer(stack, "runs").stdout
    assert trainer(stack, "runs", "--user", "42", "--json").stdout.strip() == '{\n  "runs": []\n}'

    late = trainer(stack, "cancel", run_id)
    assert late.returncode == 2
    assert late.stderr.startswith("error: CONFLICT (409): ")
    assert "[request_id " in late.stderr

    # Where no such file is, the name is the uploaded corpus's: trained on again, then canceled.
    # Long enough that the cancel always finds it queued or training.
    long = ["--size", "tiny", "--epochs", "20", "--batch-size", "8"]
    again = run_id_of(trainer(stack, "train", text.name, *long, "--json", cwd=stack.corpus_root.parent))
    canceled = trainer(stack, "cancel", again)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.strip() == f"cancellation of run {again} requested"
    assert trainer(stack, "logs", again, "-f").returncode == 1
    assert json.loads(trainer(stack, "status", again, "--json").stdout)["status"] == "canceled"


def test_a_corpus_named_on_the_server_that_fails_exits_1(stack: Stack) -> None:
    # tiny.txt, in the stack's corpus root, is too small to train on.
    run_id = run_id_of(trainer(stack, "train", "tiny.txt", *TINY, "--json"))
    followed = trainer(stack, "logs", run_id, "--follow", "--tail", "5")
    assert followed.returncode == 1
    status = trainer(stack, "status", run_id)
    assert status.returncode == 1
    assert "failed" in status.stdout
    assert "user" in status.stdout


def test_models_are_listed_as_a_table_or_the_apis_json(stack: Stack) -> None:
    table = trainer(stack, "models")
    assert table.returncode == 0
    assert "small (default)" in table.stdout
    assert "1,461,760" in table.stdout
    catalog = json.loads(trainer(stack, "models", "--json").stdout)
    assert catalog["default_family"] == "gpt2"
    assert {family["family"] for family in catalog["families"]} >= {"gpt2", "llama"}


def test_api_and_usage_errors_are_one_line_and_exit_2(stack: Stack) -> None:
    unknown = trainer(stack, "status", "no-such-run")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: NOT_FOUND (404): no run 'no-such-run' [request_id ")
    assert len(unknown.stderr.splitlines()) == 1

    closed = f"http://127.0.0.1:{devstack.free_port()}"
    unreachable = trainer(stack, "runs", api_url=closed)
    assert unreachable.returncode == 2
    assert f"is the API running at {closed}?" in unreachable.stderr

    usage = trainer(stack, "train")
    assert usage.returncode == 2
    assert "Missing argument 'CORPUS'" in usage.stderr
    bad = trainer(stack, "train", "stories.txt", "--epochs", "0")
    assert bad.returncode == 2
    invalid = trainer(stack, "train", "stories.txt", "--family", "nope")
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("error: VALIDATION_ERROR (422): ")


def test_the_command_loads_none_of_the_services_code() -> None:
    probe = (
        "import sys, trainer_client.cli, trainer_client.up\n"
        "heavy = ('trainer_api', 'trainer_tasks', 'trainer_bot', 'torch', 'lightning', 'celery')\n"
        "print(','.join(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    ("lines", "events"),
    [
        (["data: one", "", ": keepalive", "", "data: two", "data: lines", ""], ["one", "two\nlines"]),
        (["id: 7-0", "event: end", "data:", ""], [ServerSentEvent("", "end", "7-0")]),
        (["data: cut short"], []),
        (["retry: 10", "data: x", ""], ["x"]),
    ],
)
def test_server_sent_events_are_parsed_as_the_spec_says(
    lines: list[str], events: list[str | ServerSentEvent]
) -> None:
    expected = [event if isinstance(event, ServerSentEvent) else ServerSentEvent(event) for event in events]
    assert list(server_sent_events(iter(lines))) == expected


def test_queues_are_listed_and_a_queued_run_shows_its_place(stack: Stack) -> None:
    table = trainer(stack, "queues")
    assert table.returncode == 0, table.stderr
    assert "training@" in table.stdout
    assert "light@" in table.stdout
    listed = json.loads(trainer(stack, "queues", "--json").stdout)["queues"]
    assert {"training", "light"} <= {queue["name"] for queue in listed}

    offline = trainer(stack, "train", "stories.txt", *TINY, "--queue", "nowhere")
    assert offline.returncode == 2
    assert "no live worker consumes queue 'nowhere'; live queues: training" in offline.stderr

    # A registered worker that never takes anything: runs sent to its queue stay queued, in order.
    client = redis.Redis.from_url(stack.redis_url)
    parked = WorkerEntry("parked@nowhere", "nowhere", ["parked"], 1, "cpu", 1, 1)
    WorkerRegistry(client).register(parked, ttl_s=120, now=time.time())
    try:
        first, second = (
            run_id_of(trainer(stack, "train", "stories.txt", *TINY, "--queue", "parked", "--json", *more))
            for more in ([], ["--accelerator", "cpu", "--devices", "1"])
        )
        assert "next in line" in trainer(stack, "status", first).stdout
        status = trainer(stack, "status", second).stdout
        assert "parked" in status
        assert "1 run ahead of yours" in status
        for run_id in (first, second):
            assert trainer(stack, "cancel", run_id).returncode == 0
    finally:
        WorkerRegistry(client).unregister(parked.hostname)
        client.close()


def test_a_run_ahead_is_counted_for_its_owner() -> None:
    assert [runs_ahead(position) for position in (1, 2, 5)] == [
        "next in line",
        "1 run ahead of yours",
        "4 runs ahead of yours",
    ]
