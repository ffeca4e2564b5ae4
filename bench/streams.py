"""Followers against plain requests: POST /runs/train throughput with and without 50 streams held open."""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from scripts import corpus, devstack

TARGET_RATIO = 0.8
REQUEST_TIMEOUT_S = 10.0
# One follower more must have its answer's headers within this.
ANSWER_WITHIN_S = 10.0


@dataclass(frozen=True)
class Throughput:
    ok: int
    failed: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds


def post_runs(api_url: str, clients: int, seconds: float) -> Throughput:
    """`clients` threads, each POSTing runs one after the other for `seconds`; answers what came back 202."""
    body = {"corpus_path": "bench.txt", "model_size": "tiny", "max_seq_len": 32, "user_id": 0}
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def one_client() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                try:
                    status = session.post(
                        f"{api_url}/runs/train", json=body, timeout=REQUEST_TIMEOUT_S
                    ).status_code
                except requests.RequestException:
                    status = 0
                with lock:
                    counts["ok" if status == 202 else "failed"] += 1

    began = time.monotonic()
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Throughput(counts["ok"], counts["failed"], time.monotonic() - began)


@contextmanager
def followers(stream_url: str, run_id: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` clients each following the run's events (a run that stays queued: nothing ends them),
    connected and answered before the block runs; each reads what comes so the server never blocks on it."""
    address = urlsplit(stream_url)
    sockets: list[socket.socket] = []
    stop = threading.Event()

    def drain(sock: socket.socket) -> None:
        sock.settimeout(1.0)
        while not stop.is_set():
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    readers = []
    try:
        for _ in range(count):
            sock = socket.create_connection((address.hostname or "", address.port or 80), timeout=30)
            sockets.append(sock)
            request = f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n"
            sock.sendall(request.encode())
        for sock in sockets:
            reader = threading.Thread(target=drain, args=(sock,), daemon=True)
            reader.start()
            readers.append(reader)
        yield sockets
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def answered(url: str, run_id: str, within_s: float) -> bool:
    """Whether one more follower of `url` (redirects followed) gets its answer's headers within `within_s`."""
    try:
        with requests.get(f"{url}/runs/{run_id}/events", stream=True, timeout=within_s) as response:
            return response.status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def running(workdir: Path, web_env: Mapping[str, str]) -> Iterator[str]:
    """Redis and the Procfile's web line, with the stream line it brings; answers web's address."""
    with ExitStack() as stack:
        redis_service, redis_url = devstack.start_redis(workdir)
        stack.callback(redis_service.stop)
        corpus.write(workdir / "corpora" / "bench.txt", sentences=200, seed=3)
        env = {
            **devstack.stack_env(redis_url, workdir),
            # No worker: every run stays queued, on a queue no live worker consumes, and the cap on
            # queued runs must not refuse them.
            "APP__ALLOW_OFFLINE_QUEUES": "true",
            "APP__MAX_QUEUED_RUNS": "100000000",
            **web_env,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each gunicorn makes its own
        web, web_url = devstack.start_web(env, workdir / "logs")
        stack.callback(web.stop)
        yield web_url


def stream_line(web_url: str, run_id: str) -> str:
    """Where web sends a follower: the base URL of its 307 for the run's events."""
    answer = requests.get(f"{web_url}/runs/{run_id}/events", allow_redirects=False, timeout=REQUEST_TIMEOUT_S)
    location = urlsplit(answer.headers.get("Location", ""))
    if answer.status_code != 307 or not location.netloc:
        raise SystemExit(f"web did not send a follower to the stream line (HTTP {answer.status_code})")
    return f"{location.scheme}://{location.netloc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--followers", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8, help="threads POSTing runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of measurements, alone and beside")
    parser.add_argument("--web-concurrency", default="2", help="WEB_CONCURRENCY (gunicorn workers)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as scratch:
        workdir = args.workdir or Path(scratch)
        with running(workdir, {"WEB_CONCURRENCY": args.web_concurrency}) as web_url:
            warm = post_runs(web_url, args.clients, 2.0)
            response = requests.post(
                f"{web_url}/runs/train",
                json={"corpus_path": "bench.txt", "model_size": "tiny", "user_id": 0},
                timeout=REQUEST_TIMEOUT_S,
            )
            if response.status_code != 202:
                raise SystemExit(f"POST /runs/train answered {response.status_code}: {response.text}")
            run_id = str(response.json()["run_id"])
            stream_url = stream_line(web_url, run_id)
            print(f"warm-up: {warm.ok} runs posted; web sends followers to {stream_url}")
            # Alternated, so that whatever else the machine does weighs on both sides alike.
            ratios = []
            for round_number in range(1, args.rounds + 1):
                alone = post_runs(web_url, args.clients, args.seconds)
                with followers(stream_url, run_id, args.followers):
                    time.sleep(1.0)
                    one_more = answered(web_url, run_id, ANSWER_WITHIN_S)
                    beside = post_runs(web_url, args.clients, args.seconds)
                ratios.append(beside.per_s / alone.per_s if alone.per_s else 0.0)
                print(
                    f"round {round_number}: alone {describe(alone)}; {args.followers} followers on the "
                    f"stream line {describe(beside)}, a follower more (through web) answered: {one_more}; "
                    f"{ratios[-1]:.2f}x"
                )
            ratio = statistics.median(ratios)
            verdict = "meets" if ratio >= TARGET_RATIO else "misses"
            print(f"followers on the stream line: median {ratio:.2f}x of alone, {verdict} {TARGET_RATIO}x")


def describe(result: Throughput) -> str:
    return f"{result.per_s:.1f}/s ({result.ok} ok, {result.failed} failed in {result.seconds:.1f} s)"


if __name__ == "__main__":  # pragma: no cover - run by hand: python -m bench.streams
    main()
