"""Storage benchmarks: an artifact download through the API against a direct read from the store, training
throughput with the roots on an S3 server against local roots, and a hand-back's checkpoint upload."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import botocore.session
import fsspec
import redis
import requests

from bench.train_throughput import (
    Options,
    Stack,
    measure_service,
    prepare_data,
    running_stack,
    verdict,
)
from scripts import corpus, devstack
from trainer_store.runs import RunStore
from trainer_store.storage import Storage

DOWNLOAD_TARGET = 0.8
THROUGHPUT_TARGET = 0.95
SOFT_SHUTDOWN_WINDOW_S = 30.0
MB = 1024 * 1024
# Any credentials do for the S3 server the benchmark starts (moto).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def object_store(workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The S3 server on loopback with a new bucket; its s3:// URL and the variables that reach it."""
    service, endpoint = devstack.start_object_store(workdir)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"AWS_ENDPOINT_URL": endpoint, **S3_ENV}
    os.environ.update(env)  # this process reads and writes the store too
    try:
        requests.put(f"{endpoint}/{bucket}", timeout=10).raise_for_status()
        yield f"s3://{bucket}", env
    finally:
        service.stop()


def presigned_get(endpoint: str, bucket: str, key: str) -> str:
    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint)
    url: object = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    if not isinstance(url, str):
        raise TypeError("botocore gave no URL")
    return url


def streamed(url: str) -> tuple[float, int]:
    """Seconds to read the whole answer in 1 MiB chunks (as a client saving it would), and its size."""
    size = 0
    began = time.perf_counter()
    with requests.get(url, stream=True, timeout=60) as response:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=MB):
            size += len(chunk)
    return time.perf_counter() - began, size


def fsspec_read(url: str) -> tuple[float, int]:
    """Seconds to read the object with s3fs (fsspec's S3 client, as a Python user would), and its size."""
    began = time.perf_counter()
    data: object = fsspec.filesystem("s3", skip_instance_cache=True).cat_file(url)
    if not isinstance(data, bytes):
        raise TypeError("s3fs answered no bytes")
    return time.perf_counter() - began, len(data)


def digest_of(url: str) -> bytes:
    with requests.get(url, timeout=60) as response:
        response.raise_for_status()
        return hashlib.sha256(response.content).digest()


# Download: the same 40 MB object, through the API and straight from the S3 server, alternated.


def download(pairs: int, size_mb: int, workdir: Path) -> None:
    with ExitStack() as stack:
        bucket, s3_env = stack.enter_context(object_store(workdir / "s3"))
        redis_service, redis_url = devstack.start_redis(workdir)
        stack.callback(redis_service.stop)
        env = {
            **os.environ,
            **s3_env,
            "REDIS_URL": redis_url,
            "APP__ARTIFACTS_ROOT": f"{bucket}/artifacts",
            "WEB_CONCURRENCY": "1",
        }
        web, api_url = devstack.start_web(env, workdir / "logs")
        stack.callback(web.stop)
        run_id = uuid.uuid4().hex
        RunStore(redis.Redis.from_url(redis_url)).create(
            run_id=run_id, job_id="bench", user_id=0, request={}, now=time.time()
        )
        artifacts = Storage(f"{bucket}/artifacts")
        data = os.urandom(size_mb * MB)
        artifacts.write_bytes(f"models/{run_id}/model.safetensors", data)
        artifacts.write_bytes(f"models/{run_id}/manifest.json", b"{}")
        # The same object as one presigned GET from the S3 server: the store at its best.
        direct_url = presigned_get(
            s3_env["AWS_ENDPOINT_URL"],
            bucket.removeprefix("s3://"),
            f"artifacts/models/{run_id}/model.safetensors",
        )
        api_url_file = f"{api_url}/runs/{run_id}/artifact/model.safetensors"
        expected = hashlib.sha256(data).digest()
        for url in (api_url_file, direct_url):  # untimed: both answer the object, and warm up
            if digest_of(url) != expected:
                raise RuntimeError(f"{url} answered other bytes than the object")
        object_url = f"{bucket}/artifacts/models/{run_id}/model.safetensors"
        readers: dict[str, Callable[[], tuple[float, int]]] = {
            "API": lambda: streamed(api_url_file),
            "direct GET": lambda: streamed(direct_url),
            "direct s3fs": lambda: fsspec_read(object_url),
        }
        ratios: list[float] = []
        print(f"{size_mb} MB object; MB/s by round (the readers' order turns each round)")
        for index in range(1, pairs + 1):
            order = list(readers)[index % 3 :] + list(readers)[: index % 3]
            seconds: dict[str, float] = {}
            for name in order:
                seconds[name], size = readers[name]()
                if size != len(data):
                    raise RuntimeError(f"{name} answered {size} bytes, not {len(data)}")
            ratios.append(seconds["direct GET"] / seconds["API"])
            rates = "  ".join(f"{name} {size_mb / seconds[name]:,.0f} MB/s" for name in readers)
            print(f"round {index}: {rates}  API/direct GET {ratios[-1]:.3f}", flush=True)
        print(verdict("API/direct GET", ratios, DOWNLOAD_TARGET))


# Throughput: train_throughput's service side on two stacks, local roots and S3 roots, alternated.


def throughput(options: Options, workdir: Path) -> None:
    work = options.workload(corpus.write(workdir / "local" / "corpora" / "bench.txt", options.sentences, 3))
    data = prepare_data(work)
    steps_per_epoch = len(data.splits.train) // work.batch_size
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, steps_per_epoch // 10)
    print(
        f"{work.family}/{work.size}, {work.batch_size} x {work.max_seq_len} tokens, "
        f"{steps_per_epoch} steps x {work.epochs} epochs, warm-up {warmup} steps",
        flush=True,
    )
    with ExitStack() as stack:
        bucket, s3_env = stack.enter_context(object_store(workdir / "s3"))
        Storage(f"{bucket}/corpora").upload(work.corpus_path, work.corpus_path.name)
        roots = {
            **s3_env,
            "APP__CORPUS_ROOT": f"{bucket}/corpora",
            "APP__ARTIFACTS_ROOT": f"{bucket}/artifacts",
            "APP__RUNS_ROOT": f"{bucket}/runs",
        }
        stacks: dict[str, Stack] = {
            "local": stack.enter_context(running_stack(workdir / "local")),
            "s3": stack.enter_context(running_stack(workdir / "s3-stack", roots)),
        }
        for warming in stacks.values():  # untimed: a worker's first run pays for what it loads once
            measure_service(warming, work, data, warmup)
        ratios: list[float] = []
        for index in range(1, options.pairs + 1):
            rates: dict[str, float] = {}
            for name in ("s3", "local") if index % 2 else ("local", "s3"):
                outcome = measure_service(stacks[name], work, data, warmup)
                rates[name] = outcome.span.tokens_per_s(work.tokens_per_step)
            ratios.append(rates["s3"] / rates["local"])
            print(
                f"pair {index}: S3 roots {rates['s3']:,.0f} tok/s  local roots {rates['local']:,.0f} tok/s  "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
        print(verdict("S3/local", ratios, THROUGHPUT_TARGET))


# Hand-back: a gpt2/medium run on S3 roots, its worker stopped as a platform stops it.


@dataclass(frozen=True)
class HandBack:
    soft_shutdown_s: float
    to_queued_s: float
    checkpoint_mb: float
    upload_s: float


def hand_back(size: str, soft_shutdown_s: float, workdir: Path) -> HandBack:
    with ExitStack() as stack:
        bucket, s3_env = stack.enter_context(object_store(workdir / "s3"))
        corpus.write(workdir / "corpus.txt", 3000, seed=5)
        Storage(f"{bucket}/corpora").upload(workdir / "corpus.txt", "corpus.txt")
        redis_service, redis_url = devstack.start_redis(workdir)
        stack.callback(redis_service.stop)
        env = {
            **devstack.stack_env(redis_url, bucket, base={**os.environ, **s3_env}),
            "APP__CACHE_ROOT": str(workdir / "cache"),
            "WORKER_SOFT_SHUTDOWN_TIMEOUT_S": str(soft_shutdown_s),
        }
        worker = devstack.start_worker(env, workdir / "logs")
        stack.callback(worker.stop)
        web, api_url = devstack.start_web(env, workdir / "logs")
        stack.callback(web.stop)
        body: dict[str, object] = {
            "model_family": "gpt2",
            "model_size": size,
            "max_seq_len": 128,
            "batch_size": 16,
            "num_epochs": 50,
            "corpus_path": "corpus.txt",
            "user_id": 0,
        }
        response = requests.post(f"{api_url}/runs/train", json=body, timeout=30)
        response.raise_for_status()
        run_id = str(response.json()["run_id"])
        store = RunStore(redis.Redis.from_url(redis_url))
        devstack.wait_until(lambda: step_of(store, run_id) >= 1, 900, "the first step")
        began = time.perf_counter()
        os.kill(worker.process.pid, signal.SIGTERM)
        devstack.wait_until(
            lambda: (record := store.get(run_id)) is not None and record.status == "queued",
            600,
            "the hand-back",
        )
        to_queued = time.perf_counter() - began
        runs = Storage(f"{bucket}/runs")
        key = f"{run_id}/checkpoints/last.ckpt"
        local = workdir / "last.ckpt"
        runs.download(key, local)
        upload_began = time.perf_counter()
        runs.upload(local, f"{run_id}/checkpoints/upload-timed.ckpt")
        upload_s = time.perf_counter() - upload_began
        return HandBack(soft_shutdown_s, to_queued, local.stat().st_size / MB, upload_s)


def step_of(store: RunStore, run_id: str) -> int:
    record = store.get(run_id)
    step = (record.progress or {}).get("step", 0) if record else 0
    return step if isinstance(step, int) else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=["download", "throughput", "handback"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=40, help="download: the artifact's size")
    parser.add_argument("--size", default="medium", help="handback: the gpt2 size")
    parser.add_argument(
        "--soft-shutdown-s", type=float, default=2.0, help="handback: the worker's soft shutdown"
    )
    parser.add_argument("--sentences", type=int, default=8000, help="throughput: the generated corpus")
    parser.add_argument("--epochs", type=int, default=2, help="throughput: epochs a run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as scratch:
        workdir = Path(scratch)
        if args.which == "download":
            download(int(args.pairs), int(args.size_mb), workdir)
        elif args.which == "throughput":
            options = Options(
                pairs=int(args.pairs),
                family="gpt2",
                size="tiny",
                max_seq_len=128,
                batch_size=16,
                epochs=int(args.epochs),
                learning_rate=1e-3,
                seed=1337,
                sentences=int(args.sentences),
                warmup_steps=None,
                workdir=None,
            )
            throughput(options, workdir)
        else:
            result = hand_back(str(args.size), float(args.soft_shutdown_s), workdir)
            after_wait = result.to_queued_s - result.soft_shutdown_s
            print(
                f"gpt2/{args.size}: last.ckpt {result.checkpoint_mb:,.0f} MB; SIGTERM to queued again "
                f"{result.to_queued_s:.1f} s, of which {after_wait:.1f} s after the "
                f"{result.soft_shutdown_s:.0f} s soft-shutdown wait (the batch under way, the save, the "
                "upload, the hand-back); "
                f"the upload alone {result.upload_s:.1f} s "
                f"({result.checkpoint_mb / result.upload_s:,.0f} MB/s); window {SOFT_SHUTDOWN_WINDOW_S:.0f} s"
            )


if __name__ == "__main__":  # pragma: no cover - command-line entry
    main()
