"""Trains one model through the whole stack (embedded Redis, API, Celery worker) and narrates it."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis
import requests

from schemas.events import (
    EVENTS_CHANNEL,
    EvalCompleted,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    decode_event,
)
from scripts import corpus, devstack

WORKDIR = devstack.REPO_ROOT / "var" / "demo"


def describe(event: TrainEvent) -> str:
    if isinstance(event, TrainStarted):
        return (
            f"started    {event.model_family}/{event.model_size}, {event.total_epochs} epochs, "
            f"batch {event.batch_size}, queue {event.queue!r}, {event.optimal_threads} threads"
        )
    if isinstance(event, TrainProgress):
        speed = f", {event.tokens_per_sec:,.0f} tokens/s" if event.tokens_per_sec else ""
        validation = f", validation loss {event.val_loss:.3f}" if event.val_loss is not None else ""
        position = f"epoch {event.epoch}/{event.total_epochs}, step {event.step}"
        return f"progress   {position}, loss {event.loss:.3f}{speed}{validation}"
    if isinstance(event, TrainCompleted):
        return (
            f"completed  validation loss {event.loss:.4f}, perplexity {event.perplexity:.3f}\n"
            f"           artifacts: {event.artifact_path}"
        )
    if isinstance(event, TrainFailed):
        return f"failed     ({event.error_kind}, {event.status}) {event.message}"
    if isinstance(event, EvalCompleted):
        return f"evaluated  {event.split} loss {event.loss:.4f}, perplexity {event.perplexity:.3f}"
    return f"evaluation of the {event.split} split failed ({event.error_kind}) {event.message}"


@contextmanager
def local_stack(workdir: Path) -> Iterator[tuple[str, str, Path]]:
    """Redis, worker and API for the demo; everything stops when the block ends."""
    corpora = workdir / "corpora"
    with ExitStack() as stack:
        redis_service, redis_url = devstack.start_redis(workdir)
        stack.callback(redis_service.stop)
        env = {**devstack.stack_env(redis_url, workdir, corpora=corpora), "WEB_CONCURRENCY": "1"}
        print(f"starting   Redis, Celery worker and API (logs in {workdir / 'logs'}) ...", flush=True)
        worker = devstack.start_worker(env, workdir / "logs")
        stack.callback(worker.stop)
        web, api_url = devstack.start_web(env, workdir / "logs")
        stack.callback(web.stop)
        yield api_url, redis_url, corpora


def follow(redis_url: str, submit: dict[str, object], api_url: str, timeout_s: float) -> TrainEvent:
    """Submit the run and print its events as they arrive; answers the last one."""
    client = redis.Redis.from_url(redis_url)
    subscriber = client.pubsub()
    subscriber.subscribe(EVENTS_CHANNEL)
    response = requests.post(f"{api_url}/runs/train", json=submit, timeout=10)
    response.raise_for_status()
    run_id = response.json()["run_id"]
    print(f"submitted  run {run_id}", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = subscriber.get_message(ignore_subscribe_messages=True, timeout=1.0)
        event = decode_event(message["data"]) if message else None
        if event is None or isinstance(event, NotAnEvent) or event.run_id != run_id:
            continue
        print(describe(event), flush=True)
        if isinstance(event, (TrainCompleted, TrainFailed)):
            return event
    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", help="model size (tiny, small)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=6000, help="size of the generated corpus")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--workdir", type=Path, default=WORKDIR, help="emptied first; logs and artifacts stay"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    shutil.rmtree(args.workdir, ignore_errors=True)
    with local_stack(args.workdir) as (api_url, redis_url, corpora):
        corpus.write(corpora / "stories.txt", args.sentences)
        request: dict[str, object] = {
            "model_family": "gpt2",
            "model_size": args.size,
            "num_epochs": args.epochs,
            "max_seq_len": 64,
            "batch_size": 16,
            "learning_rate": 2e-3,
            "corpus_path": "stories.txt",
            "user_id": 0,
        }
        final = follow(redis_url, request, api_url, args.timeout)
    print(f"done in    {time.monotonic() - started:.0f} s", flush=True)
    return 0 if isinstance(final, TrainCompleted) else 1


if __name__ == "__main__":  # pragma: no cover - command-line entry
    sys.exit(main())
