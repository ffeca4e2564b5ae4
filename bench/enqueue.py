"""POST /runs/train under load and POST to the started event: the API against its floor, and how soon
training starts.

`load`: wrk (Debian's package, installed here if missing and possible) runs beside the Procfile's web
line and beside the minimal app under the same flags, on loopback, at 16 and 64 connections; every
request carries a random user_id. The caps are raised through their settings, and a registry entry
stands in for a training worker (none runs: tasks pile up in Redis).
`flags`: the minimal app under candidate gunicorn flags, to place the web line's among them.
`started`: an idle, warm training worker; runs with a trained tokenizer, one at a time, from POST to the
started event, with where the time went.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from schemas.events import EVENTS_CHANNEL, TrainStarted, decode_event
from scripts import corpus, devstack
from trainer_store.runs import run_log_key
from trainer_store.workers import WorkerEntry, WorkerRegistry

WEB_APP = "'trainer_api:create_app()'"
MINIMAL_APP = "'bench.minimal_app:create_app()'"
# The web line's gunicorn concurrency flags, and the candidates the `flags` part measures instead.
WEB_CONCURRENCY = re.compile(r"--worker-class \S+ --workers \S+( --threads \S+)?")
CANDIDATE_FLAGS = (
    "--worker-class sync --workers 2",
    "--worker-class sync --workers 3",
    "--worker-class gthread --workers 2 --threads 2",
    "--worker-class gthread --workers 3 --threads 2",
    "--worker-class gthread --workers 2 --threads 4",
    "--worker-class gthread --workers 2 --threads 8",
)
SETUP_LINE = re.compile(r"set up for training in (.+)$")
# wrk's Lua: each request a fresh body with a random Discord user id.
SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = '{"corpus_path":"bench.txt","user_id":' .. math.random(1, 2000000000) ..
    ',"model_size":"tiny","max_seq_len":32,"batch_size":8}'
  return wrk.format(nil, "/runs/train", nil, body)
end
"""


@dataclass(frozen=True)
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: str


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is missing: apt-get install wrk")
    return found


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if found is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]


def parse(output: str) -> Load:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if rate is None or p50 is None or p99 is None:
        raise ValueError(f"wrk said:\n{output}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", output)
    return Load(float(rate.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors.group(0) if errors else "")


def load(wrk: str, url: str, script: Path, connections: int, seconds: int) -> Load:
    argv = [wrk, "--latency", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "-s", str(script), url]
    return parse(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def serve(command: str, env: dict[str, str], logs: Path, name: str) -> tuple[devstack.Service, str]:
    port = devstack.free_port()
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    service = devstack.start(name, ["sh", "-c", f"exec {command}"], env, logs)
    url = f"http://127.0.0.1:{port}"
    devstack.wait_ready(service, lambda: devstack.http_answers(f"{url}/openapi.json"), 60)
    # Warm both up the same way before measuring: imports, connections, first requests.
    for _ in range(50):
        requests.post(f"{url}/runs/train", json={"corpus_path": "bench.txt", "user_id": 1}, timeout=10)
    return service, url


def base_env(work: Path, redis_url: str) -> dict[str, str]:
    return {
        **devstack.stack_env(redis_url, work),
        "APP__MAX_ACTIVE_RUNS_PER_USER": "0",
        "APP__MAX_QUEUED_RUNS": "0",
    }


def loaded(
    servers: dict[str, str], env: dict[str, str], work: Path, options: argparse.Namespace
) -> dict[str, dict[int, Load]]:
    """Each server's Load at each connection count, with a stand-in worker registered."""
    wrk = ensure_wrk()
    client = redis.Redis.from_url(env["REDIS_URL"])
    stand_in = WorkerEntry("bench@nowhere", "nowhere", ["training"], 1, "cpu", 1, 0)
    WorkerRegistry(client).register(stand_in, ttl_s=3600, now=time.time())
    script = work / "post.lua"
    script.write_text(SCRIPT)
    # Rounds take the servers in turn, so a slow spell of the machine falls on all of them alike.
    rounds: dict[str, dict[int, list[Load]]] = {
        name: {c: [] for c in options.connections} for name in servers
    }
    for _ in range(options.rounds):
        for name, command in servers.items():
            service, url = serve(command, env, work / "logs", re.sub(r"\W+", "-", name))
            try:
                for connections in options.connections:
                    rounds[name][connections].append(load(wrk, url, script, connections, options.seconds))
            finally:
                service.stop()
    return {name: {c: median_load(loads) for c, loads in rows.items()} for name, rows in rounds.items()}


def median_load(loads: list[Load]) -> Load:
    """The round with the median rate, whole (its latencies belong with it)."""
    ranked = sorted(loads, key=lambda row: row.requests_per_s)
    return ranked[(len(ranked) - 1) // 2]


def print_rows(results: dict[str, dict[int, Load]], width: int) -> None:
    print(f"{'server':<{width}} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for name, rows in results.items():
        for connections, row in rows.items():
            print(
                f"{name:<{width}} {connections:>5} {row.requests_per_s:>8.0f} {row.p50_ms:>8.1f} "
                f"{row.p99_ms:>8.1f}  {row.errors}"
            )


def compare_load(work: Path, env: dict[str, str], options: argparse.Namespace) -> None:
    """The web line against the minimal app under the web line's flags."""
    web_line = devstack.procfile_command("web")
    servers = {"web line": web_line, "minimal app": web_line.replace(WEB_APP, MINIMAL_APP)}
    results = loaded(servers, env, work, options)
    print(
        f"POST /runs/train, median of {options.rounds} rounds of {options.seconds} s, {os.cpu_count()} CPUs, "
        "wrk -t 2 on the same machine"
    )
    print(f"flags: {web_line.split('gunicorn', 1)[1].rsplit(' ', 1)[0].strip()}")
    print_rows(results, 12)
    for connections in options.connections:
        web, floor = results["web line"][connections], results["minimal app"][connections]
        rate, p99 = web.requests_per_s / floor.requests_per_s, web.p99_ms / floor.p99_ms
        print(
            f"at {connections} connections: req/s {rate:.2f}x the minimal app's (target >= 0.85), "
            f"p99 {p99:.2f}x (target <= 1.5)"
        )


def compare_flags(work: Path, env: dict[str, str], options: argparse.Namespace) -> None:
    """The minimal app under each candidate's concurrency flags; the web line's share of the best."""
    minimal = devstack.procfile_command("web").replace(WEB_APP, MINIMAL_APP)
    found = WEB_CONCURRENCY.search(minimal)
    if found is None:
        raise SystemExit("the web line names no --worker-class and --workers")
    web_flags = found.group(0).replace("${WEB_CONCURRENCY:-", "").replace("}", "")
    candidates = dict.fromkeys((web_flags, *CANDIDATE_FLAGS))
    servers = {flags: WEB_CONCURRENCY.sub(flags, minimal) for flags in candidates}
    results = loaded(servers, env, work, options)
    print(
        f"the minimal app's POST /runs/train, median of {options.rounds} rounds of {options.seconds} s, "
        f"{os.cpu_count()} CPUs"
    )
    print_rows(results, 46)
    for connections in options.connections:
        best = max(results, key=lambda flags: results[flags][connections].requests_per_s)
        share = results[web_flags][connections].requests_per_s / results[best][connections].requests_per_s
        print(
            f"at {connections} connections: best {best!r}; the web line's flags reach {share:.2f}x of it "
            "(target >= 0.9)"
        )


@dataclass(frozen=True)
class Started:
    """One run from POST to its started event, in seconds: the whole and its parts."""

    total_s: float
    parts: dict[str, float]


def started_latency(work: Path, env: dict[str, str], options: argparse.Namespace) -> None:
    """An idle, warm training worker: runs with a trained tokenizer, one at a time, POST to started."""
    logs = work / "logs"
    corpus.write(work / "corpora" / "started.txt", sentences=2000, seed=2)
    web, url = devstack.start_web(env, logs)
    workers = [
        devstack.start_worker(env, logs, "training"),
        devstack.start_worker(env, logs, "light", line="light_worker"),
    ]
    client = redis.Redis.from_url(env["REDIS_URL"])
    events = client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(EVENTS_CHANNEL)
    try:
        tokenizer_id = trained_tokenizer(url)
        body = {
            "corpus_path": "started.txt",
            "tokenizer_id": tokenizer_id,
            "user_id": 0,
            "model_size": "tiny",
            "max_seq_len": 64,
            "batch_size": 8,
        }
        timed(url, body, events, client)  # warm: imports and first-use caches in the pool process
        measured = [timed(url, body, events, client) for _ in range(options.runs)]
    finally:
        events.close()
        for service in (*workers, web):
            service.stop()
    totals = [run.total_s for run in measured]
    print(f"POST /runs/train to the started event: {len(measured)} runs one at a time, idle warm worker")
    print(f"median {statistics.median(totals):.3f} s, max {max(totals):.3f} s (target median < 1.0 s)")
    print("where the time goes (median of each part):")
    for part in measured[0].parts:
        print(f"  {part:<28} {statistics.median(run.parts[part] for run in measured):.3f} s")


def trained_tokenizer(url: str) -> str:
    answer = requests.post(
        f"{url}/tokenizers/train", json={"corpus_path": "started.txt", "vocab_size": 1024}, timeout=10
    )
    answer.raise_for_status()
    tokenizer_id = str(answer.json()["tokenizer_id"])
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{url}/tokenizers/{tokenizer_id}", timeout=10).json()["status"]) != (
        "completed"
    ):
        if status == "failed" or time.monotonic() > deadline:
            raise SystemExit(f"the tokenizer did not train: {status}")
        time.sleep(0.2)
    return tokenizer_id


def timed(url: str, body: dict[str, object], events: redis.client.PubSub, client: redis.Redis) -> Started:
    """POST one run, wait for its started event, cancel it; the whole and where it went."""
    posted = time.time()
    answer = requests.post(f"{url}/runs/train", json=body, timeout=10)
    answer.raise_for_status()
    run_id = str(answer.json()["run_id"])
    started = started_event(events, run_id)
    seen = time.time()
    requests.post(f"{url}/runs/{run_id}/cancel", timeout=10).raise_for_status()
    record = wait_ended(url, run_id)
    setup_ts, steps = setup_steps(client, run_id)
    started_ts = started.ts if started.ts is not None else seen
    parts = {
        "API (POST to record)": seconds(record, "created_at") - posted,
        "task pickup (to claim)": seconds(record, "started_at") - seconds(record, "created_at"),
        **{f"setup: {step}": seconds for step, seconds in steps.items()},
        "Lightning setup in fit()": started_ts - setup_ts,
    }
    return Started(seen - posted, parts)


def seconds(record: dict[str, object], name: str) -> float:
    value = record[name]
    if not isinstance(value, (int, float)):
        raise SystemExit(f"the record's {name} is {value!r}")
    return float(value)


def started_event(events: redis.client.PubSub, run_id: str) -> TrainStarted:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = events.get_message(timeout=1.0)
        if message is None:
            continue
        event = decode_event(message["data"])
        if isinstance(event, TrainStarted) and event.run_id == run_id:
            return event
    raise SystemExit(f"run {run_id} never started")


def wait_ended(url: str, run_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record: dict[str, object] = requests.get(f"{url}/runs/{run_id}", timeout=10).json()
        if record["status"] not in ("queued", "running"):
            return record
        time.sleep(0.1)
    raise SystemExit(f"run {run_id} never ended")


def setup_steps(client: redis.Redis, run_id: str) -> tuple[float, dict[str, float]]:
    """The worker's "set up for training in ..." line: when it was logged, and each step's seconds."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the run log reaches Redis from a background writer
        for _, fields in client.xrange(run_log_key(run_id)) or []:
            line = json.loads((fields or {})[b"line"])
            found = SETUP_LINE.search(line["message"])
            if found:
                steps = re.findall(r"(\w+) (\d+\.\d+) s", found.group(1))
                return float(line["ts"]), {step: float(seconds) for step, seconds in steps}
        time.sleep(0.1)
    raise SystemExit(f"run {run_id} logged no setup line")


PARTS = {"load": compare_load, "flags": compare_flags, "started": started_latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=["load", "started"])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run's duration")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per server and connection count")
    parser.add_argument("--runs", type=int, default=20, help="runs timed from POST to started")
    options = parser.parse_args()
    for part in options.parts:
        with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as folder:
            work = Path(folder)
            redis_service, redis_url = devstack.start_redis(work)
            corpus.write(work / "corpora" / "bench.txt", sentences=50, seed=1)
            try:
                PARTS[part](work, base_env(work, redis_url), options)
            finally:
                redis_service.stop()


if __name__ == "__main__":  # pragma: no cover - a command
    main()
