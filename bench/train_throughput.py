"""Training throughput: a run through the service against a plain PyTorch loop doing the same work."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import requests
import torch
from torch.utils.data import DataLoader

from schemas.events import (
    EVENTS_STREAM,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    decode_event,
)
from scripts import corpus, devstack
from trainer_store.storage import Storage
from trainer_tasks import resources
from trainer_tasks.data import Splits, encode, split_blocks
from trainer_tasks.model import build_model, warmup_cosine
from trainer_tasks.tokenization import read_corpus, train_tokenizer
from trainer_tasks.training import loaders

TARGET_RATIO = 0.98
RUN_TIMEOUT_S = 1800.0
HOLDOUT_FRACTION = 0.1  # the API's default, which the service run uses
CORPUS_SEED = 3


@dataclass(frozen=True)
class Workload:
    """One training job, described once for both sides."""

    family: str
    size: str
    max_seq_len: int
    batch_size: int
    epochs: int
    learning_rate: float
    seed: int
    corpus_path: Path

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.max_seq_len

    def request_body(self) -> dict[str, object]:
        return {
            "model_family": self.family,
            "model_size": self.size,
            "max_seq_len": self.max_seq_len,
            "batch_size": self.batch_size,
            "num_epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "holdout_fraction": HOLDOUT_FRACTION,
            # Its key under the corpus root, which holds the file under the same name.
            "corpus_path": self.corpus_path.name,
            "user_id": 0,
        }


@dataclass(frozen=True)
class Span:
    """Steps `start_step` (exclusive) to `end_step` and the seconds between their marks."""

    start_step: int
    end_step: int
    seconds: float

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return (self.end_step - self.start_step) * tokens_per_step / self.seconds


@dataclass(frozen=True)
class Outcome:
    span: Span
    val_loss: float


@dataclass(frozen=True)
class Stack:
    api_url: str
    redis_url: str


@dataclass(frozen=True)
class Data:
    splits: Splits
    vocab_size: int


# The measured span, the same on both sides: it starts at the mark of the first step at or after the
# warm-up that the service reported mid-epoch (its progress event is stamped right after that step),
# and ends at the mark of the last epoch's end, after its validation pass and checkpoints.


def span_start_step(progress: Sequence[TrainProgress], warmup_steps: int, steps_per_epoch: int) -> int:
    """The first progress step past the warm-up that is not an epoch's end (those come after validation)."""
    for event in progress:
        if event.step >= warmup_steps and event.step % steps_per_epoch != 0:
            return event.step
    raise RuntimeError("the service sent no progress event past the warm-up: train longer")


def service_span(progress: Sequence[TrainProgress], start_step: int) -> Span:
    start = next(event for event in progress if event.step == start_step)
    end = progress[-1]  # the last epoch's end: sent after its validation and checkpoints
    if start.ts is None or end.ts is None:
        raise RuntimeError("progress events without a timestamp")
    return Span(start_step, end.step, end.ts - start.ts)


# The service side: the real stack, one run at a time through POST /runs/train.


@contextmanager
def running_stack(workdir: Path, settings: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """Redis, the training worker and the API, as scripts.devstack starts them for the tests; the roots
    are local folders of `workdir` unless `settings` says otherwise."""
    logs = workdir / "logs"
    redis_service, redis_url = devstack.start_redis(workdir)
    env = {**devstack.stack_env(redis_url, workdir), **(settings or {})}
    worker_cwd = workdir / "worker-cwd"
    worker_cwd.mkdir(parents=True, exist_ok=True)
    services = [redis_service]
    try:
        services.append(devstack.start_worker(env, logs, cwd=worker_cwd))
        web, api_url = devstack.start_web(env, logs)
        services.append(web)
        yield Stack(api_url, redis_url)
    finally:
        for service in reversed(services):
            service.stop()


def stream_entries(response: object) -> Iterator[tuple[bytes, bytes]]:
    """(entry id, event payload) pairs from an XREAD or XRANGE answer (RESP2 lists)."""
    items = response if isinstance(response, list) else []
    for item in items:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], list):
            yield from stream_entries(item[1])  # XREAD: [stream name, entries]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            entry_id, fields = item
            payload = fields.get(b"event")
            if isinstance(entry_id, bytes) and isinstance(payload, bytes):
                yield entry_id, payload


def last_stream_id(client: redis.Redis) -> bytes:
    newest = list(stream_entries(client.xrevrange(EVENTS_STREAM, count=1)))
    return newest[0][0] if newest else b"0-0"


def run_events(client: redis.Redis, run_id: str, after_id: bytes) -> list[TrainEvent]:
    """The run's events from the durable stream, until its terminal event."""
    events: list[TrainEvent] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        # A blocking read: the benchmark process sleeps in Redis while the worker trains.
        for entry_id, payload in stream_entries(client.xread({EVENTS_STREAM: after_id}, block=1000)):
            after_id = entry_id
            event = decode_event(payload)
            if isinstance(event, NotAnEvent) or event.run_id != run_id:
                continue
            events.append(event)
            if isinstance(event, (TrainCompleted, TrainFailed)):
                return events
    raise TimeoutError(f"run {run_id} did not finish within {RUN_TIMEOUT_S:.0f} s")


def submit(api_url: str, work: Workload) -> str:
    response = requests.post(f"{api_url}/runs/train", json=work.request_body(), timeout=30)
    response.raise_for_status()
    run_id: object = response.json().get("run_id")
    if not isinstance(run_id, str):
        raise TypeError(f"POST /runs/train answered no run id: {response.text}")
    return run_id


def service_run(stack: Stack, work: Workload) -> list[TrainEvent]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        after_id = last_stream_id(client)
        return run_events(client, submit(stack.api_url, work), after_id)
    finally:
        client.close()


def completion(events: Sequence[TrainEvent]) -> TrainCompleted:
    for event in events:
        if isinstance(event, TrainCompleted):
            return event
    raise RuntimeError(f"the service run did not complete: {events[-1]}")


def check_same_model(completed: TrainCompleted, vocab_size: int) -> None:
    """The run's manifest must show the vocabulary the plain loop uses, else the work differs."""
    manifest: object = json.loads(Storage(completed.artifact_path).read_bytes("manifest.json"))
    served = manifest.get("vocab_size") if isinstance(manifest, dict) else None
    if served != vocab_size:
        raise RuntimeError(f"the service's vocabulary has {served} tokens, the plain loop's {vocab_size}")


def measure_service(stack: Stack, work: Workload, data: Data, warmup_steps: int) -> Outcome:
    events = service_run(stack, work)
    final = completion(events)
    check_same_model(final, data.vocab_size)
    steps_per_epoch = len(data.splits.train) // work.batch_size
    progress = [event for event in events if isinstance(event, TrainProgress)]
    start_step = span_start_step(progress, warmup_steps, steps_per_epoch)
    return Outcome(service_span(progress, start_step), final.loss)


# The plain side: the same model, data, optimizer, schedule, validation and checkpoints, in this process.


def prepare_data(work: Workload) -> Data:
    """Tokenizer and blocks exactly as the worker makes them from the same corpus."""
    text = read_corpus(work.corpus_path)
    tokenizer = train_tokenizer(text)
    ids = encode(tokenizer, text)
    splits = split_blocks(ids, work.max_seq_len, work.batch_size, HOLDOUT_FRACTION)
    return Data(splits, tokenizer.get_vocab_size())


def batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=batch, labels=batch).loss
    if not isinstance(loss, torch.Tensor):
        raise TypeError("the model returned no loss")
    return loss


def validate(model: torch.nn.Module, loader: DataLoader[torch.Tensor]) -> float:
    """Mean loss over the validation blocks, weighted by batch size as Lightning's epoch mean is."""
    model.train(False)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            total += float(batch_loss(model, batch)) * len(batch)
            count += len(batch)
    model.train(True)
    return total / count


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


def plain_run(work: Workload, data: Data, folder: Path) -> tuple[list[float], float]:
    """Trains once; answers the perf_counter mark after each step (index = global step, 0 = start,
    an epoch's last step marked after its validation and checkpoints) and the last validation loss."""
    torch.manual_seed(work.seed)
    model = build_model(work.family, work.size, data.vocab_size, work.max_seq_len)
    model.train(True)
    train_loader, validation_loader = loaders(data.splits, work.batch_size, work.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.learning_rate, weight_decay=0.01)
    schedule = warmup_cosine(len(train_loader) * work.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    folder.mkdir(parents=True, exist_ok=True)
    best, val_loss = math.inf, math.nan
    marks = [time.perf_counter()]
    for _ in range(work.epochs):
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(batch_loss(model, batch))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            marks.append(time.perf_counter())
        val_loss = validate(model, validation_loader)
        if val_loss < best:
            best = val_loss
            save_checkpoint(folder / "best.ckpt", model, optimizer)
        save_checkpoint(folder / "last.ckpt", model, optimizer)
        marks[-1] = time.perf_counter()
    return marks, val_loss


def measure_plain(work: Workload, data: Data, folder: Path, span: Span) -> Outcome:
    marks, val_loss = plain_run(work, data, folder)
    if len(marks) - 1 != span.end_step:
        raise RuntimeError(f"plain loop ran {len(marks) - 1} steps, the service {span.end_step}")
    seconds = marks[span.end_step] - marks[span.start_step]
    return Outcome(Span(span.start_step, span.end_step, seconds), val_loss)


# The benchmark: alternate pairs, then report.


@dataclass(frozen=True)
class Pair:
    service: Outcome
    plain: Outcome

    def ratio(self, tokens_per_step: int) -> float:
        return self.service.span.tokens_per_s(tokens_per_step) / self.plain.span.tokens_per_s(tokens_per_step)


def describe(index: int, pair: Pair, tokens_per_step: int) -> str:
    span = pair.service.span
    return (
        f"pair {index}: steps {span.start_step}->{span.end_step}  "
        f"service {span.tokens_per_s(tokens_per_step):,.0f} tok/s  "
        f"plain {pair.plain.span.tokens_per_s(tokens_per_step):,.0f} tok/s  "
        f"ratio {pair.ratio(tokens_per_step):.3f}  "
        f"val_loss service {pair.service.val_loss:.4f} plain {pair.plain.val_loss:.4f}"
    )


def summary(pairs: Sequence[Pair], tokens_per_step: int) -> str:
    return verdict("service/plain", [pair.ratio(tokens_per_step) for pair in pairs], TARGET_RATIO)


def verdict(label: str, ratios: Sequence[float], target: float) -> str:
    """The ratios of each pair, their median and whether it meets the target."""
    median = statistics.median(ratios)
    met = "met" if median >= target else "NOT met"
    return (
        f"ratios {label}: {', '.join(f'{ratio:.3f}' for ratio in ratios)}\n"
        f"median ratio {median:.3f}: target (>= {target}) {met}"
    )


@dataclass(frozen=True)
class Options:
    pairs: int
    family: str
    size: str
    max_seq_len: int
    batch_size: int
    epochs: int
    learning_rate: float
    seed: int
    sentences: int
    warmup_steps: int | None
    workdir: Path | None

    def workload(self, corpus_path: Path) -> Workload:
        return Workload(
            family=self.family,
            size=self.size,
            max_seq_len=self.max_seq_len,
            batch_size=self.batch_size,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            seed=self.seed,
            corpus_path=corpus_path,
        )


def run_pairs(options: Options, workdir: Path) -> list[Pair]:
    work = options.workload(corpus.write(workdir / "corpora" / "bench.txt", options.sentences, CORPUS_SEED))
    data = prepare_data(work)
    steps_per_epoch = len(data.splits.train) // work.batch_size
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, steps_per_epoch // 10)
    threads = resources.available_cpus()
    torch.set_num_threads(threads)  # what the worker sets for its runs
    print(
        f"{work.family}/{work.size}, vocab {data.vocab_size}, {work.batch_size} x {work.max_seq_len} tokens, "
        f"{steps_per_epoch} steps x {work.epochs} epochs, warm-up {warmup} steps, {threads} threads",
        flush=True,
    )
    pairs: list[Pair] = []
    with running_stack(workdir) as stack:
        for index in range(1, options.pairs + 1):
            service = measure_service(stack, work, data, warmup)
            plain = measure_plain(work, data, workdir / "plain" / str(index), service.span)
            pairs.append(Pair(service, plain))
            print(describe(index, pairs[-1], work.tokens_per_step), flush=True)
    return pairs


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5, help="(service, plain) pairs, alternated")
    parser.add_argument("--family", default="gpt2")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--sentences", type=int, default=8000, help="size of the generated corpus")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps left out (default: 10%% of an epoch)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the stack's files here")
    args = parser.parse_args(argv)
    return Options(
        pairs=int(args.pairs),
        family=str(args.family),
        size=str(args.size),
        max_seq_len=int(args.max_seq_len),
        batch_size=int(args.batch_size),
        epochs=int(args.epochs),
        learning_rate=float(args.learning_rate),
        seed=int(args.seed),
        sentences=int(args.sentences),
        warmup_steps=None if args.warmup_steps is None else int(args.warmup_steps),
        workdir=None if args.workdir is None else Path(args.workdir),
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    if options.workdir is not None:
        pairs = run_pairs(options, options.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
            pairs = run_pairs(options, Path(scratch))
    print(summary(pairs, options.batch_size * options.max_seq_len))


if __name__ == "__main__":  # pragma: no cover - command-line entry
    main()
