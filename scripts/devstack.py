"""Starts the local stack for the demo and the tests: an embedded Redis, then Procfile processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

# The same helpers as `trainer up`; the tests import them from here.
from trainer_client.up import free_port as free_port
from trainer_client.up import read_procfile
from trainer_client.up import redis_answers as redis_answers
from trainer_client.up import redis_server_binary as redis_server_binary
from trainer_store.storage import S3_SCHEME

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    """A started process with its log file; stop() ends it gently, then firmly."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # Started for this one and stopped with it (the web line's stream line).
    companions: list[Service] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> int:
        for companion in self.companions:
            companion.stop(timeout_s)
        if self.process.poll() is None:
            # A new session per service: the signal reaches its children (gunicorn and pool workers).
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


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


def api_healthy(url: str) -> bool:
    # A loaded machine can take over a second for gunicorn's first answer: that is "not yet".
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def stack_env(
    redis_url: str,
    files: str | Path,
    *,
    corpora: str | Path | None = None,
    base: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """What every process of a stack is given: `base`, its Redis, and the file roots under `files` (a
    folder, or an s3:// URL): `corpora/` unless `corpora` names another, `artifacts/`, `runs/`, and for
    a folder the workers' cache (`cache/`); on an object store each process keeps its own default cache."""
    env = {
        **base,
        "REDIS_URL": redis_url,
        "APP__CORPUS_ROOT": str(corpora) if corpora is not None else f"{files}/corpora",
        "APP__ARTIFACTS_ROOT": f"{files}/artifacts",
        "APP__RUNS_ROOT": f"{files}/runs",
    }
    if not str(files).startswith(S3_SCHEME):
        env["APP__CACHE_ROOT"] = f"{files}/cache"
    return env


def start_redis(workdir: Path, *, port: int | None = None, append_only: bool = False) -> tuple[Service, str]:
    """A private Redis on a loopback port (a free one unless given); answers the service and its URL.

    Memory-only, unless `append_only`: then every write goes to an append-only file in `workdir`,
    synced at once, so a Redis started again there (on the same port) finds everything.
    """
    port = port or free_port()
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if append_only else "no",
    ]
    if append_only:
        argv += ["--appendfsync", "always"]
    argv += ["--dir", str(workdir)]
    service = start("redis", argv, os.environ, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    wait_ready(service, lambda: redis_answers(url), 10)
    return service, url


def start_object_store(workdir: Path, check_credentials: bool = False) -> tuple[Service, str]:
    """An S3-protocol server (moto) on a free loopback port, keeping objects in memory; its endpoint URL.

    moto takes any credentials; with check_credentials it checks them against its own (empty) records,
    so it refuses every request as S3 refuses an unknown access key.
    """
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.is_file():
        raise RuntimeError("no moto_server: install the test extra (moto[server])")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else os.environ
    service = start("s3", [str(moto), "-H", "127.0.0.1", "-p", str(port)], env, workdir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(service, lambda: http_answers(url), 30)
    return service, url


def http_answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except (requests.ConnectionError, requests.Timeout):
        return False
    return True


def procfile_command(name: str) -> str:
    try:
        return read_procfile(REPO_ROOT / "Procfile")[name]
    except KeyError:
        raise KeyError(f"no {name!r} line in the Procfile") from None


def start_procfile(
    line: str, env: Mapping[str, str], log_dir: Path, cwd: Path = REPO_ROOT, name: str | None = None
) -> Service:
    """Run a Procfile line as a platform would: through the shell, so ${VAR:-default} expands."""
    return start(name or line, ["sh", "-c", f"exec {procfile_command(line)}"], env, log_dir, cwd)


def start_web(env: Mapping[str, str], log_dir: Path, cwd: Path = REPO_ROOT) -> tuple[Service, str]:
    """The web line, with the stream line it sends followed streams and downloads to; stopped together."""
    stream_port, port = free_port(), free_port()
    stream_url = f"http://127.0.0.1:{stream_port}"
    stream = start_procfile(
        "stream", {**env, "HOST": "127.0.0.1", "STREAM_PORT": str(stream_port)}, log_dir, cwd
    )
    web_env = {**env, "HOST": "127.0.0.1", "PORT": str(port), "APP__STREAM_URL": stream_url}
    service = start_procfile("web", web_env, log_dir, cwd)
    service.companions.append(stream)  # so that stopping web, or a web never ready, stops it too
    url = f"http://127.0.0.1:{port}"
    wait_ready(service, lambda: api_healthy(url) and api_healthy(stream_url), 60)
    return service, url


def start_worker(
    env: Mapping[str, str], log_dir: Path, name: str = "worker", cwd: Path = REPO_ROOT, line: str = "worker"
) -> Service:
    """A Procfile worker line (`worker` trains, `light_worker` runs tokenizer and evaluation tasks)."""
    service = start_procfile(line, {**env, "WORKER_NAME": name}, log_dir, cwd=cwd, name=name)
    wait_ready(service, worker_ready(service), 90)
    return service


def worker_ready(service: Service) -> Callable[[], bool]:
    """Celery logs "<hostname> ready." once it consumes from its queues."""
    return lambda: " ready." in service.log()
