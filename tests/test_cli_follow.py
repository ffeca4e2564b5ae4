"""`trainer train --follow`: a live progress bar from the run's events, the results, and Ctrl-C."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from schemas.events import NotAnEvent, TrainCompleted, TrainProgress
from tests.conftest import Stack
from tests.test_cli import TINY, TRAINER, trainer
from trainer_client.client import RunEvent, RunInfo, TrainerClient
from trainer_client.follow import DETACHED, Followed, duration, follow_run, outcome, show, stats

LONG = ["--size", "tiny", "--epochs", "20", "--batch-size", "8"]


def test_a_followed_run_shows_its_progress_then_its_results_and_its_model_downloads(
    stack: Stack, tmp_path: Path
) -> None:
    result = trainer(stack, "train", "stories.txt", *TINY, "--follow")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[1]
    assert result.stdout.startswith(f"run {run_id} queued")
    assert "epoch 1/1" in result.stdout
    assert re.search(r"perplexity\s+\d+\.\d{3}", result.stdout)
    assert re.search(rf"artifacts\s+\S*{run_id}", result.stdout)
    assert f"trainer download {run_id}" in result.stdout
    assert "sample:" in result.stdout
    assert "follow it with" not in result.stdout

    # Into a folder (as model-RUN.zip), or to a file named; a valid zip either way, nothing else left.
    into_folder = trainer(stack, "download", run_id, str(tmp_path))
    assert into_folder.returncode == 0, into_folder.stderr
    saved = tmp_path / f"model-{run_id}.zip"
    assert into_folder.stdout.startswith(f"saved {saved} (")
    named = trainer(stack, "download", run_id, str(tmp_path / "mine.zip"))
    assert named.returncode == 0, named.stderr
    for path in (saved, tmp_path / "mine.zip"):
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
            assert {"config.json", "manifest.json"} <= set(archive.namelist())
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["mine.zip", saved.name])
    in_cwd = trainer(stack, "download", run_id, cwd=tmp_path / "..")
    assert in_cwd.returncode == 0, in_cwd.stderr
    assert (tmp_path.parent / saved.name).is_file()


def test_downloads_that_cannot_happen_exit_2_and_leave_nothing(stack: Stack, tmp_path: Path) -> None:
    missing = trainer(stack, "download", "no-such-run", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: NOT_FOUND (404): ")
    nowhere = trainer(stack, "download", "no-such-run", str(tmp_path / "no" / "model.zip"))
    assert nowhere.returncode == 2
    assert "no folder" in nowhere.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_followed_run_that_fails_exits_1_and_says_why(stack: Stack) -> None:
    result = trainer(stack, "train", "tiny.txt", *TINY, "--follow", "--json")
    assert result.returncode == 1
    # stdout stays the API's answer; the bar and the outcome are on stderr.
    assert set(result.stdout.split('"')) >= {"run_id", "job_id"}
    assert re.search(r"run \S+ failed \(user error\): ", result.stderr)


def wait_running(stack: Stack, run_id: str) -> None:
    client = TrainerClient(stack.api_url)
    deadline = time.monotonic() + 120
    while client.run(run_id).status != "running":
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    client.close()


def cancel_and_wait(stack: Stack, run_id: str) -> str:
    client = TrainerClient(stack.api_url)
    if client.run(run_id).status in ("queued", "running"):
        client.cancel(run_id)
    deadline = time.monotonic() + 120
    while (status := client.run(run_id).status) in ("queued", "running"):
        assert time.monotonic() < deadline, "the run never ended"
        time.sleep(0.1)
    client.close()
    return status


def test_ctrl_c_without_a_terminal_only_detaches(stack: Stack) -> None:
    env = {**stack.env, "TRAINER_API_URL": stack.api_url, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [TRAINER, "train", "stories.txt", *LONG, "--follow"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        run_id = first.split()[1]
        wait_running(stack, run_id)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == DETACHED
        assert f"detached; the run goes on: trainer status {run_id}" in rest
        assert TrainerClient(stack.api_url).run(run_id).status == "running"
    finally:
        process.kill()
        process.wait()
    assert cancel_and_wait(stack, run_id) == "canceled"


class InterruptedOnce(TrainerClient):
    """A client whose first read of the events is cut short by Ctrl-C, at a point the test chooses."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.interrupted = False

    def events(self, run_id: str, after: str | None = None) -> Iterator[RunEvent]:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().events(run_id, after=after)


@pytest.mark.parametrize("answer", [True, False, None], ids=["yes", "no", "nobody-to-ask"])
def test_ctrl_c_cancels_on_a_yes_and_detaches_otherwise(stack: Stack, answer: bool | None) -> None:
    # The same paths as the signal tests, in this process: a real signal can land anywhere, including
    # inside a subprocess's coverage tracer, which then stops measuring that process.
    started = trainer(stack, "train", "stories.txt", *LONG)
    run_id = started.stdout.split()[1]
    wait_running(stack, run_id)
    output = StringIO()
    api = InterruptedOnce(stack.api_url)
    try:
        ask = None if answer is None else (lambda: answer)
        status = follow_run(api, run_id, Console(file=output, width=200), ask_cancel=ask)
    finally:
        api.close()
    if answer:
        assert status == 1
        assert f"cancellation of run {run_id} requested" in output.getvalue()
        assert f"run {run_id} canceled" in output.getvalue()
        assert TrainerClient(stack.api_url).run(run_id).status == "canceled"
    else:
        assert status == DETACHED
        assert f"detached; the run goes on: trainer status {run_id}" in output.getvalue()
        assert TrainerClient(stack.api_url).run(run_id).status == "running"
        assert cancel_and_wait(stack, run_id) == "canceled"


def read_until(fd: int, wanted: str, timeout_s: float = 60) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while wanted not in seen:
        assert time.monotonic() < deadline, f"{wanted!r} never came; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the terminal closed: the process has ended
                break
    return seen


@pytest.mark.parametrize(("answer", "status"), [("y", 1), ("n", DETACHED)])
def test_ctrl_c_on_a_terminal_asks_whether_to_cancel(stack: Stack, answer: str, status: int) -> None:
    env = {**stack.env, "TRAINER_API_URL": stack.api_url, "COLUMNS": "200"}
    main, attached = pty.openpty()
    process = subprocess.Popen(
        [TRAINER, "train", "stories.txt", *LONG, "--follow"],
        env=env,
        stdin=attached,
        stdout=attached,
        stderr=attached,
    )
    os.close(attached)
    try:
        queued = read_until(main, "queued")
        run_id = re.findall(r"run (\S+) queued", queued)[0]
        wait_running(stack, run_id)
        process.send_signal(signal.SIGINT)
        read_until(main, f"cancel run {run_id}? [y/N]")
        os.write(main, f"{answer}\n".encode())
        ended = read_until(main, "trainer status" if answer == "n" else "canceled", timeout_s=120)
        assert process.wait(timeout=60) == status
        if answer == "y":
            assert f"cancellation of run {run_id} requested" in ended
        else:
            assert TrainerClient(stack.api_url).run(run_id).status == "running"
    finally:
        process.kill()
        process.wait()
        os.close(main)
    assert cancel_and_wait(stack, run_id) == "canceled"


def test_what_the_bar_and_the_outcome_show() -> None:
    console = Console(file=StringIO(), width=200)
    bare = TrainProgress(request_id="r", run_id="r", user_id=0, epoch=1, total_epochs=2, step=3, loss=2.0)
    assert stats(bare) == "step 3  loss 2.0000"
    assert duration(3725) == "1:02:05"
    assert duration(65) == "1:05"
    with Progress(console=console) as bar:
        task = bar.add_task("x", total=10, stats="")
        show(NotAnEvent("unknown type"), Followed(), bar, task)
        assert bar.tasks[0].description == "x"

    completed = RunInfo("r1", "completed", 0, "completed", 1.0, 2.5, 12.18, None, "models/r1")
    assert outcome(completed, console) == 0
    running = RunInfo("r2", "running", 0, "training", 1.0, None, None, None)
    assert outcome(running, console) == 0
    canceled = RunInfo("r3", "canceled", 0, "canceled by the user", 1.0, None, None, None)
    assert outcome(canceled, console) == 1
    # An older worker's completed event carries no parameter count, duration or sample.
    bare_end = TrainCompleted(
        request_id="r4", run_id="r4", user_id=0, loss=2.0, perplexity=7.389, artifact_path="models/r4"
    )
    assert outcome(bare_end, console) == 0
    unmeasured = RunInfo("r5", "completed", 0, "completed", 1.0, None, None, None, "models/r5")
    assert outcome(unmeasured, console) == 0
    text = console.file.getvalue() if isinstance(console.file, StringIO) else ""
    assert "perplexity  12.180" in text
    assert "run r3 canceled: canceled by the user" in text
    assert "perplexity  7.389" in text
    assert "parameters" not in text
