"""Runs under faults: two workers train a batch of runs while whole workers are killed (SIGKILL to the
process group), pool processes are killed, workers are stopped (SIGTERM) and Redis restarts once."""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from schemas.api import TrainRequest
from schemas.events import EVENTS_STREAM, NotAnEvent, TrainCompleted, TrainEvent, TrainFailed, decode_event
from scripts import corpus, devstack
from trainer_store.records import text
from trainer_store.runs import RunRecord, RunStore, lease_key
from trainer_tasks.app import TRAIN_TASK

LEASE_S = 3.0
FAULTS = ("kill-worker", "kill-pool-child", "sigterm")


@dataclass
class DeadWorkerRun:
    """A run whose worker was killed outright: when it last beat, and when it went back to the queue."""

    run_id: str
    attempt: int
    last_heartbeat_ts: float
    requeued_at: float | None = None


@dataclass
class Chaos:
    workdir: Path
    env: dict[str, str]
    redis_port: int
    redis_service: devstack.Service
    workers: dict[str, devstack.Service] = field(default_factory=dict)
    generation: int = 0
    faults: list[str] = field(default_factory=list)
    dead_runs: list[DeadWorkerRun] = field(default_factory=list)

    def start_worker(self, slot: str) -> None:
        self.generation += 1
        name = f"{slot}-{self.generation}"
        self.workers[slot] = devstack.start_procfile(
            "worker", {**self.env, "WORKER_NAME": name}, self.workdir / "logs", name=name
        )

    def wait_workers(self) -> None:
        for service in self.workers.values():
            devstack.wait_ready(service, devstack.worker_ready(service), 180)

    def restart_redis(self) -> None:
        os.kill(self.redis_service.process.pid, signal.SIGKILL)
        self.redis_service.process.wait()
        time.sleep(1.0)
        self.redis_service, _ = devstack.start_redis(
            self.workdir / "redis", port=self.redis_port, append_only=True
        )
        self.faults.append("redis-restart")

    def ready_slots(self) -> list[str]:
        """Workers up and consuming: a fault on one still starting would test only its start."""
        return [
            slot
            for slot, service in sorted(self.workers.items())
            if service.process.poll() is None and devstack.worker_ready(service)()
        ]

    def fault(self, kind: str, slot: str, client: redis.Redis, run_ids: list[str]) -> None:
        service = self.workers[slot]
        if kind == "kill-pool-child":
            for child in children(service.process.pid):
                os.kill(child, signal.SIGKILL)  # Celery starts another; the run's lease outlives it
        elif kind == "kill-worker":
            pids = children(service.process.pid)
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
            self.dead_runs.extend(runs_held_by(client, RunStore(client), run_ids, pids))
            self.start_worker(slot)
        else:
            os.kill(service.process.pid, signal.SIGTERM)  # a soft shutdown: the run is handed back
            try:
                service.process.wait(60)
            except subprocess.TimeoutExpired:  # a stop that hangs is ended firmly
                os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()
            self.start_worker(slot)
        self.faults.append(kind)

    def stop(self) -> None:
        for service in self.workers.values():
            service.stop()
        self.redis_service.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def runs_held_by(
    client: redis.Redis, store: RunStore, run_ids: list[str], pids: list[int]
) -> list[DeadWorkerRun]:
    """The running runs whose lease a process of `pids` holds (holders read `host:pid:token`)."""
    markers = [f":{pid}:" for pid in pids]
    found: list[DeadWorkerRun] = []
    for run_id in run_ids:
        holder = text(client.get(lease_key(run_id)) or b"")
        record = store.get(run_id)
        if any(marker in holder for marker in markers) and record is not None and record.status == "running":
            found.append(DeadWorkerRun(run_id, record.attempt, record.last_heartbeat_ts or time.time()))
    return found


def events_by_run(client: redis.Redis) -> dict[str, list[TrainEvent]]:
    found: dict[str, list[TrainEvent]] = {}
    for _, fields in client.xrange(EVENTS_STREAM) or []:
        raw = (fields or {}).get(b"event")
        if not isinstance(raw, bytes):
            continue
        event = decode_event(raw)
        if not isinstance(event, NotAnEvent):
            found.setdefault(event.run_id, []).append(event)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fault-every-s", type=float, default=15.0)
    parser.add_argument("--deadline-s", type=float, default=600.0, help="faults stop after this")
    parser.add_argument(
        "--settle-s", type=float, default=240.0, help="then runs not ended this much later are stuck"
    )
    parser.add_argument("--seed", type=int, default=7)
    options = parser.parse_args(argv)
    report(run(options.runs, options.fault_every_s, options.deadline_s, options.settle_s, options.seed))


@dataclass(frozen=True)
class Outcome:
    submitted: int
    records: dict[str, RunRecord | None]
    events: dict[str, list[TrainEvent]]
    faults: list[str]
    dead_runs: list[DeadWorkerRun]
    took_s: float


def run(runs: int, fault_every_s: float, deadline_s: float, settle_s: float, seed: int) -> Outcome:
    chooser = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as folder:
        workdir = Path(folder)
        (workdir / "redis").mkdir()
        redis_service, url = devstack.start_redis(workdir / "redis", append_only=True)
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        env = {
            **devstack.stack_env(url, workdir, corpora=workdir),
            "APP__LEASE_S": str(LEASE_S),
            "APP__HEARTBEAT_INTERVAL_S": "0.5",
            "APP__PROGRESS_INTERVAL_S": "1",
            "APP__CHECKPOINT_INTERVAL_S": "2",
            "WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "2",
        }
        client = redis.Redis.from_url(url, socket_timeout=5)
        store = RunStore(client)
        chaos = Chaos(workdir, env, port, redis_service)
        began = time.monotonic()
        try:
            for slot in ("a", "b"):
                chaos.start_worker(slot)
            chaos.wait_workers()
            corpus_name = corpus.write(workdir / "stories.txt", 300, seed=5).name
            run_ids = submit(store, url, runs, corpus_name)
            redis_restart_at = began + deadline_s / 8
            next_fault = time.monotonic() + fault_every_s
            while time.monotonic() - began < deadline_s + settle_s:
                records = safe_records(store, run_ids)
                note_requeued(chaos.dead_runs, records)
                if all(record is not None and record.is_terminal for record in records.values()):
                    break
                now = time.monotonic()
                if now - began >= deadline_s:
                    pass  # no more faults: the runs left get settle_s to end
                elif redis_restart_at and now >= redis_restart_at:
                    chaos.restart_redis()
                    redis_restart_at = 0.0
                elif now >= next_fault and (ready := chaos.ready_slots()):
                    chaos.fault(chooser.choice(FAULTS), chooser.choice(ready), client, run_ids)
                    next_fault = time.monotonic() + fault_every_s
                time.sleep(0.2)
            records = safe_records(store, run_ids)
            return Outcome(
                runs,
                records,
                events_by_run(client),
                chaos.faults,
                chaos.dead_runs,
                time.monotonic() - began,
            )
        finally:
            chaos.stop()


def submit(store: RunStore, url: str, count: int, corpus_name: str) -> list[str]:
    broker = Celery(broker=url)
    run_ids = [f"chaos-{index:02d}" for index in range(count)]
    for index, run_id in enumerate(run_ids):
        request = TrainRequest(
            model_family="gpt2",
            model_size="tiny",
            max_seq_len=32,
            num_epochs=1,
            batch_size=8,
            learning_rate=1e-3,
            corpus_path=corpus_name,
            tokenizer_id="auto",
            user_id=7,
            seed=index,
        )
        store.create(run_id=run_id, job_id=run_id, user_id=7, request=request.to_mapping(), now=time.time())
        broker.send_task(TRAIN_TASK, args=[run_id], queue="training")
    return run_ids


def safe_records(store: RunStore, run_ids: list[str]) -> dict[str, RunRecord | None]:
    """Each run's record; while Redis restarts, retried until it answers."""
    while True:
        try:
            return {run_id: store.get(run_id) for run_id in run_ids}
        except redis.RedisError:
            time.sleep(0.2)


def note_requeued(dead_runs: list[DeadWorkerRun], records: dict[str, RunRecord | None]) -> None:
    for dead in dead_runs:
        record = records.get(dead.run_id)
        moved = record is not None and (record.status != "running" or record.attempt > dead.attempt)
        if dead.requeued_at is None and moved:
            dead.requeued_at = time.time()


def report(outcome: Outcome) -> None:
    completed = failed = stuck = twice = 0
    for run_id, record in outcome.records.items():
        ends = [
            event
            for event in outcome.events.get(run_id, [])
            if isinstance(event, (TrainCompleted, TrainFailed))
        ]
        if len(ends) > 1:
            twice += 1
        if record is None or not record.is_terminal:
            stuck += 1
        elif record.status == "completed":
            completed += 1
        elif any(isinstance(event, TrainFailed) for event in ends):
            failed += 1
    failures = [
        f"{run_id}: {record.message}"
        for run_id, record in sorted(outcome.records.items())
        if record is not None and record.status == "failed"
    ]
    waits = [dead.requeued_at - dead.last_heartbeat_ts for dead in outcome.dead_runs if dead.requeued_at]
    print(f"submitted {outcome.submitted}")
    print(f"completed {completed}")
    print(f"failed with an event {failed}")
    for failure in failures:
        print(f"  {failure}")
    print(f"stuck {stuck}")
    for run_id, record in sorted(outcome.records.items()):
        if record is None or not record.is_terminal:
            detail = f"{record.status}, attempt {record.attempt}: {record.message}" if record else "no record"
            print(f"  {run_id}: {detail}")
    print(f"executed twice {twice}")
    print(
        f"faults {len(outcome.faults)}: "
        + ", ".join(f"{kind} {outcome.faults.count(kind)}" for kind in sorted(set(outcome.faults)))
    )
    print(f"dead workers' runs {len(outcome.dead_runs)}, back in the queue {len(waits)}")
    if waits:
        print(
            "longest wait of a dead worker's run (last heartbeat to back in the queue) "
            f"{max(waits):.1f} s; lease {LEASE_S:g} s"
        )
    print(f"took {outcome.took_s:.0f} s")


if __name__ == "__main__":  # pragma: no cover - a command-line program
    main()
