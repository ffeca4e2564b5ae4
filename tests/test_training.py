"""trainer_tasks.training, data and model: a real tiny GPT-2 trained on a generated corpus, end to end."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from schemas.api import TrainRequest
from schemas.events import (
    EVENTS_STREAM,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    decode_event,
)
from schemas.models import FAMILIES, ModelFamily, ModelShape, gpt2_params, model_shape
from scripts import corpus, devstack
from trainer_store import runlog
from trainer_store.cache import FileCache
from trainer_store.layout import FileStores, model_folder, run_folder
from trainer_store.runlog import RunLogWriter
from trainer_store.runs import RunRecord, RunStore
from trainer_store.settings import Settings
from trainer_store.storage import Storage
from trainer_tasks import distributed, resources, training
from trainer_tasks.artifacts import MetricsLog, plot_loss_curve
from trainer_tasks.data import BlockDataset, encode, split_blocks
from trainer_tasks.errors import LeaseLost, RunCanceled, TimeLimitReached, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.model import LanguageModel, build_model, count_parameters
from trainer_tasks.reporting import RunReporter
from trainer_tasks.runner import RunContext
from trainer_tasks.tokenization import END_OF_TEXT, read_corpus, train_tokenizer

USER_ID = 123456789012345678
SENTENCES = 150
EPOCHS = 2
BATCH = 4
# The sample written with the artifacts needs 8 prompt + 40 new positions (see the short-context test).
SEQ_LEN = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Two intra-op threads on a shared 2-core machine can run twenty times slower under contention."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resources, "available_cpus", lambda: 1)
        yield
    torch.set_num_threads(threads)


def request(corpus_path: Path, **overrides: float) -> TrainRequest:
    """The corpus is named by its key under the corpus root, which is the folder it is in."""
    return TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=SEQ_LEN,
        num_epochs=int(overrides.get("num_epochs", EPOCHS)),
        batch_size=BATCH,
        learning_rate=float(overrides.get("learning_rate", 1e-3)),
        corpus_path=corpus_path.name,
        tokenizer_id="auto",
        user_id=USER_ID,
        seed=int(overrides.get("seed", 1337)),
        test_fraction=0.1,
    )


def local_files(root: Path, corpus_path: Path) -> FileStores:
    return FileStores(
        Storage(str(corpus_path.parent)), Storage(str(root / "artifacts")), Storage(str(root / "runs"))
    )


def redis_url_of(client: redis.Redis) -> str:
    """The URL a process of its own (a DDP rank) connects with to the same Redis."""
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def context_for(
    client: redis.Redis,
    run_id: str,
    train_request: TrainRequest,
    root: Path,
    corpus_path: Path,
    cancel_requested: Callable[[], bool] = lambda: False,
    lease_lost: Callable[[], bool] = lambda: False,
    files: FileStores | None = None,
    cache_root: Path | None = None,
) -> RunContext:
    """A claimed run and the context the runner would give the training (local roots by default)."""
    store = RunStore(client)
    store.create(
        run_id=run_id, job_id=f"job-{run_id}", user_id=USER_ID, request=train_request.to_mapping(), now=1.0
    )
    assert store.claim(run_id, "worker-a", 60, 2.0)
    reporter = RunReporter(
        run_id=run_id, user_id=USER_ID, holder="worker-a", store=store, bus=EventBus(client, 10_000)
    )
    return RunContext(
        run_id=run_id,
        request=train_request,
        reporter=reporter,
        files=files or local_files(root, corpus_path),
        cache=FileCache(cache_root or root / "cache", 10**9),
        log_lines=RunLogWriter(client, run_id, 10_000).write,
        queue=train_request.queue,
        worker="training@box-1",
        torch_threads=1,
        progress_interval_s=0.0,
        cancel_requested=cancel_requested,
        lease_lost=lease_lost,
        settings=Settings(redis_url=redis_url_of(client)),
    )


def artifact_dir(context: RunContext) -> Path:
    return Path(context.files.artifacts.url(model_folder(context.run_id)))


def run_dir(context: RunContext) -> Path:
    return Path(context.files.runs.url(run_folder(context.run_id)))


def events_of(client: redis.Redis, run_id: str) -> list[TrainEvent]:
    events: list[TrainEvent] = []
    entries = client.xrange(EVENTS_STREAM)
    assert entries is not None
    for _, fields in entries:
        assert fields is not None
        event = decode_event(fields[b"event"])
        assert not isinstance(event, NotAnEvent)
        if event.run_id == run_id:
            events.append(event)
    return events


def record_of(client: redis.Redis, run_id: str) -> RunRecord:
    record = RunStore(client).get(run_id)
    assert record is not None
    return record


def losses(events: list[TrainEvent], epoch: int = 1) -> list[tuple[int, float]]:
    return [
        (event.step, event.loss)
        for event in events
        if isinstance(event, TrainProgress) and event.epoch == epoch
    ]


@dataclass(frozen=True)
class Trained:
    context: RunContext
    events: list[TrainEvent]
    record: RunRecord
    corpus_path: Path


@pytest.fixture(scope="module")
def trained(redis_url: str, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[Trained]:
    """One real run, shared by the tests that only read what it produced."""
    root = tmp_path_factory.mktemp("trained")
    corpus_path = corpus.write(root / "corpus.txt", SENTENCES, seed=0)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    context = context_for(client, "run-trained", request(corpus_path), root, corpus_path)
    training.train(context)
    yield Trained(context, events_of(client, "run-trained"), record_of(client, "run-trained"), corpus_path)
    client.close()


def test_a_run_sends_started_progress_and_completed_in_order(trained: Trained) -> None:
    events = trained.events
    assert isinstance(events[0], TrainStarted)
    assert isinstance(events[-1], TrainCompleted)
    assert all(isinstance(event, TrainProgress) for event in events[1:-1])
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert len({event.event_id for event in events}) == len(events)
    stamps = [event.ts or 0.0 for event in events]
    assert stamps == sorted(stamps)
    assert all(event.user_id == USER_ID and event.request_id == "run-trained" for event in events)


def test_the_started_event_describes_the_run(trained: Trained) -> None:
    started = trained.events[0]
    assert isinstance(started, TrainStarted)
    assert (started.model_family, started.model_size, started.total_epochs) == ("gpt2", "tiny", EPOCHS)
    assert (started.queue, started.batch_size, started.learning_rate) == ("training", BATCH, 1e-3)
    # train() sets torch's threads to the worker's share of the cores (one, in these tests) and uses no
    # loader workers; the event names the worker that took the run.
    assert (started.cpu_cores, started.optimal_threads, started.optimal_workers) == (1, 1, 0)
    assert (started.torch_threads, started.worker) == (1, "training@box-1")


def test_progress_comes_every_step_and_at_each_epoch_end(trained: Trained) -> None:
    progress = [event for event in trained.events if isinstance(event, TrainProgress)]
    steps_per_epoch = max(event.step for event in progress if event.epoch == 1)
    assert steps_per_epoch > 5
    expected: list[tuple[int, int]] = []
    for epoch in range(1, EPOCHS + 1):
        first = (epoch - 1) * steps_per_epoch + 1
        expected += [(epoch, step) for step in range(first, epoch * steps_per_epoch + 1)]
        expected.append((epoch, epoch * steps_per_epoch))
    assert [(event.epoch, event.step) for event in progress] == expected
    assert all(event.total_epochs == EPOCHS and math.isfinite(event.loss) for event in progress)
    assert trained.record.progress is not None
    assert trained.record.progress["step"] == EPOCHS * steps_per_epoch
    # It learns: the last epoch's losses are lower than the first steps'.
    assert progress[-1].loss < progress[0].loss


def test_the_record_holds_the_result(trained: Trained) -> None:
    done = trained.events[-1]
    assert isinstance(done, TrainCompleted)
    record = trained.record
    assert record.status == "completed"
    assert record.loss == pytest.approx(done.loss)
    assert record.perplexity == pytest.approx(math.exp(done.loss))
    assert done.artifact_path == str(artifact_dir(trained.context))
    assert record.artifact_path == done.artifact_path
    assert run_dir(trained.context).is_dir()


def test_the_artifact_loads_offline_and_generates(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = artifact_dir(trained.context)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, GPT2LMHeadModel)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (2, 128, SEQ_LEN)
    assert tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.model_max_length == SEQ_LEN
    prompt = tokenizer("The old fisherman", return_tensors="pt")
    output = model.generate(
        prompt["input_ids"], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert isinstance(output, torch.Tensor)
    assert output.shape == (1, prompt["input_ids"].shape[1] + 3)
    text = tokenizer.decode(output[0])
    assert isinstance(text, str)
    assert text.startswith("The old fisherman")


def test_the_manifest_records_params_and_request(trained: Trained) -> None:
    folder = artifact_dir(trained.context)
    manifest = json.loads((folder / "manifest.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, torch.nn.Module)
    assert manifest["run_id"] == "run-trained"
    assert manifest["request"] == trained.context.request.to_mapping()
    assert manifest["params"] == count_parameters(model)
    assert manifest["vocab_size"] == model.config.vocab_size
    assert manifest["seed"] == 1337
    assert manifest["threads"] == 1
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["lightning"] == L.__version__
    assert manifest["started_at"] <= manifest["ended_at"]
    done = trained.events[-1]
    assert isinstance(done, TrainCompleted)
    assert manifest["metrics"]["val_loss"] == pytest.approx(done.loss)
    assert (done.params, done.sample) == (manifest["params"], manifest["sample"])
    assert isinstance(done.sample, str)
    assert done.sample
    for name in ("metrics.csv", "loss_curve.png", "logs.jsonl", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    # The run log says where the setup before training went, step by step.
    messages = [json.loads(line)["message"] for line in (folder / "logs.jsonl").read_text().splitlines()]
    setup = next(line for line in messages if " set up for training in " in line)
    steps = re.findall(r"(\w+) (\d+\.\d{3}) s", setup.split(" in ", 1)[1])
    assert [step for step, _ in steps] == ["corpus", "tokenizer", "encoding", "splits", "model", "trainer"]
    splits = run_dir(trained.context) / "splits"
    validation, test = torch.load(splits / "validation.pt"), torch.load(splits / "test.pt")
    assert validation.shape[1] == test.shape[1] == SEQ_LEN
    assert len(test) >= 1


def test_the_same_seed_gives_the_same_losses(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    same = context_for(redis_client, "run-same", request(trained.corpus_path), tmp_path, trained.corpus_path)
    training.train(same)
    other = context_for(
        redis_client,
        "run-other",
        request(trained.corpus_path, num_epochs=1, seed=7),
        tmp_path,
        trained.corpus_path,
    )
    training.train(other)
    same_events = events_of(redis_client, "run-same")
    for epoch in range(1, EPOCHS + 1):
        assert losses(same_events, epoch) == losses(trained.events, epoch)
    assert losses(events_of(redis_client, "run-other")) != losses(trained.events)


@pytest.mark.parametrize("max_seq_len", [8, 16])
def test_a_short_context_run_completes(
    max_seq_len: int, trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """max_seq_len 8..47 is a valid request (the API allows 8 and up); the run must still complete."""
    short = dataclasses.replace(request(trained.corpus_path, num_epochs=1), max_seq_len=max_seq_len)
    run_id = f"run-short-{max_seq_len}"
    context = context_for(redis_client, run_id, short, tmp_path, trained.corpus_path)
    training.train(context)
    assert record_of(redis_client, run_id).status == "completed"
    done = events_of(redis_client, run_id)[-1]
    assert isinstance(done, TrainCompleted)
    assert isinstance(done.sample, str)
    assert AutoModelForCausalLM.from_pretrained(artifact_dir(context)).config.n_positions == max_seq_len


class ShutdownAtStep:
    """A cancel check that raises SystemExit (as Lightning does on SIGTERM) on its `step`-th call."""

    def __init__(self, step: int) -> None:
        self.calls = 0
        self._step = step

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == self._step:
            raise SystemExit(1)
        return False


def test_a_shutdown_saves_last_and_the_next_delivery_resumes_there(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    one_epoch = request(trained.corpus_path, num_epochs=1)
    context = context_for(
        redis_client,
        "run-resume",
        one_epoch,
        tmp_path,
        trained.corpus_path,
        cancel_requested=ShutdownAtStep(3),
    )
    with pytest.raises(SystemExit):
        training.train(context)
    checkpoint = run_dir(context) / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 3
    # A shutdown is no failure: nothing ended, the record still says running.
    assert [type(event) for event in events_of(redis_client, "run-resume")] == [
        TrainStarted,
        TrainProgress,
        TrainProgress,
    ]
    assert record_of(redis_client, "run-resume").status == "running"
    # The redelivery (same run folder) continues from step 3 rather than starting over.
    again = dataclasses.replace(context, cancel_requested=lambda: False)
    training.train(again)
    events = events_of(redis_client, "run-resume")
    resumed = [event.step for event in events[3:] if isinstance(event, TrainProgress)]
    assert resumed[0] == 4
    assert isinstance(events[-1], TrainCompleted)
    assert record_of(redis_client, "run-resume").status == "completed"
    # The metrics hold both attempts, each step at most once: the first attempt's came back with its
    # checkpoint. Step 3 trained but has no row: the shutdown stopped the run there before any callback
    # after the guard saw it.
    rows = list(csv.DictReader((artifact_dir(again) / "metrics.csv").open()))
    steps = [int(row["step"]) for row in rows if row["train_loss"]]
    assert steps == [1, 2, *range(4, steps[-1] + 1)]
    assert steps[-1] == resumed[-1]
    assert [row["epoch"] for row in rows if row["val_loss"]] == ["1"]


def test_a_run_stopped_after_its_last_epoch_completes_from_its_final_checkpoint(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stops after fit() returned, as it saves the artifacts: the next attempt has no epoch
    left to train, and completes with the loss the trained model has."""
    one_epoch = request(trained.corpus_path, num_epochs=1)
    context = context_for(redis_client, "run-at-end", one_epoch, tmp_path, trained.corpus_path)
    save_artifacts = training.save_artifacts

    def shut_down(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(training, "save_artifacts", save_artifacts)
        raise SystemExit(1)

    monkeypatch.setattr(training, "save_artifacts", shut_down)
    with pytest.raises(SystemExit):
        training.train(context)
    checkpoint = torch.load(run_dir(context) / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1  # taken after the one epoch
    first = events_of(redis_client, "run-at-end")
    [final_val_loss] = [event.val_loss for event in first if isinstance(event, TrainProgress)][-1:]
    assert final_val_loss is not None

    training.train(context)
    events = events_of(redis_client, "run-at-end")
    # No step trained again: the one event added is the completion, with the same model's loss.
    assert [type(event) for event in events[len(first) :]] == [TrainCompleted]
    completed = events[-1]
    assert isinstance(completed, TrainCompleted)
    assert completed.loss == pytest.approx(final_val_loss, rel=1e-5)
    record = record_of(redis_client, "run-at-end")
    assert (record.status, record.loss) == ("completed", completed.loss)
    # The first attempt's rows came back with its checkpoint; the loss measured again belongs to the one
    # epoch trained, at the step it ended on.
    rows = list(csv.DictReader((artifact_dir(context) / "metrics.csv").open()))
    last_step = str(checkpoint["global_step"])
    assert [row["step"] for row in rows if row["train_loss"]][-1] == last_step
    validations = [row for row in rows if row["val_loss"]]
    assert [(row["step"], row["epoch"]) for row in validations] == [(last_step, "1"), (last_step, "1")]
    measured, measured_again = (float(row["val_loss"]) for row in validations)
    assert measured == pytest.approx(final_val_loss, rel=1e-5)
    assert measured_again == pytest.approx(completed.loss)


def test_a_lost_lease_stops_training_reports_nothing_and_saves_no_checkpoint(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    context = context_for(
        redis_client,
        "run-lost",
        request(trained.corpus_path),
        tmp_path,
        trained.corpus_path,
        lease_lost=lambda: True,
    )
    with pytest.raises(LeaseLost, match="run run-lost: lease lost at step 1"):
        training.train(context)
    # Only the started event: the executor that took the run over reports how it ends.
    assert [type(event) for event in events_of(redis_client, "run-lost")] == [TrainStarted]
    assert record_of(redis_client, "run-lost").status == "running"
    assert not (run_dir(context) / "checkpoints").exists()
    assert not artifact_dir(context).exists()


class TrueFromCall:
    """A check that answers True from its `call`-th call on (one call per training step)."""

    def __init__(self, call: int) -> None:
        self.calls = 0
        self._call = call

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self._call


def test_last_is_saved_by_time_within_an_epoch(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    one_epoch = request(trained.corpus_path, num_epochs=1)
    context = dataclasses.replace(
        context_for(redis_client, "run-timed", one_epoch, tmp_path, trained.corpus_path),
        lease_lost=TrueFromCall(4),  # stops at step 4 without a checkpoint of its own
        checkpoint_interval_s=0.001,
    )
    with pytest.raises(LeaseLost):
        training.train(context)
    checkpoint = torch.load(run_dir(context) / "checkpoints" / "last.ckpt", weights_only=False)
    # Saved by time at the end of step 3, in the middle of the first epoch (which has more steps).
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (3, 0)
    steps_per_epoch = max(
        event.step for event in trained.events if isinstance(event, TrainProgress) and event.epoch == 1
    )
    assert steps_per_epoch > 3


def test_a_run_over_its_time_limit_checkpoints_and_fails_naming_the_limit(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    context = dataclasses.replace(
        context_for(redis_client, "run-long", request(trained.corpus_path), tmp_path, trained.corpus_path),
        over_time_limit=TrueFromCall(2),
        max_run_s=90.0,
    )
    with pytest.raises(TimeLimitReached):
        training.train(context)
    record = record_of(redis_client, "run-long")
    assert (record.status, record.error_kind) == ("failed", "user")
    assert record.message == (
        "the run reached the training time limit of 90 s (APP__MAX_RUN_S) at step 2; "
        "its last checkpoint is kept"
    )
    assert isinstance(events_of(redis_client, "run-long")[-1], TrainFailed)
    checkpoint = torch.load(run_dir(context) / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert not artifact_dir(context).exists()


def test_a_huge_learning_rate_fails_as_the_users(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    context = context_for(
        redis_client,
        "run-diverges",
        request(trained.corpus_path, learning_rate=1e30, num_epochs=1),
        tmp_path,
        trained.corpus_path,
    )
    with pytest.raises(UserError, match="lower the learning rate"):
        training.train(context)
    failed = events_of(redis_client, "run-diverges")[-1]
    assert isinstance(failed, TrainFailed)
    assert (failed.error_kind, failed.status) == ("user", "failed")
    assert "1e+30" in failed.message
    record = record_of(redis_client, "run-diverges")
    assert (record.status, record.error_kind) == ("failed", "user")
    assert not artifact_dir(context).exists()


def test_a_cancel_request_stops_the_run_after_fit_returns(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path
) -> None:
    no_test_split = dataclasses.replace(request(trained.corpus_path), test_fraction=0.0)
    context = context_for(
        redis_client,
        "run-cancel",
        no_test_split,
        tmp_path,
        trained.corpus_path,
        cancel_requested=lambda: True,
    )
    with pytest.raises(RunCanceled):
        training.train(context)
    # Stopped after its first step, with no artifacts and no completion: the runner reports the cancel.
    events = events_of(redis_client, "run-cancel")
    assert [type(event) for event in events] == [TrainStarted, TrainProgress, TrainProgress]
    assert {event.step for event in events if isinstance(event, TrainProgress)} == {1}
    assert record_of(redis_client, "run-cancel").status == "running"
    assert not artifact_dir(context).exists()
    # Without a test fraction only the validation split is kept.
    assert sorted(path.name for path in (run_dir(context) / "splits").iterdir()) == ["validation.pt"]


def test_a_corpus_too_small_for_one_batch(redis_client: redis.Redis, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("A corpus of one short line.\n")
    context = context_for(redis_client, "run-small", request(small), tmp_path, small)
    with pytest.raises(UserError, match="too small") as raised:
        training.train(context)
    assert "batch_size" in str(raised.value)
    assert "max_seq_len" in str(raised.value)
    # It fails before training starts; the runner reports the error.
    assert events_of(redis_client, "run-small") == []


def test_a_missing_corpus_is_the_users_to_fix(redis_client: redis.Redis, tmp_path: Path) -> None:
    context = context_for(
        redis_client, "run-gone", request(tmp_path / "gone.txt"), tmp_path, tmp_path / "gone.txt"
    )
    with pytest.raises(UserError, match="no longer exists"):
        training.train(context)


def test_corpora_that_cannot_be_read(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 3\)"):
        read_corpus(latin1)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    with pytest.raises(UserError, match="empty"):
        read_corpus(blank)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_corpus(empty)
    with pytest.raises(UserError, match="no longer exists"):
        read_corpus(tmp_path / "missing.txt")
    good = tmp_path / "good.txt"
    good.write_text("naïve text\n", encoding="utf-8")
    assert read_corpus(good) == "naïve text\n"


def test_the_tokenizer_round_trips_any_text(tmp_path: Path) -> None:
    text = corpus.generate(40, seed=1)
    tokenizer = train_tokenizer(text, vocab_size=300)
    assert tokenizer.get_vocab_size() <= 300
    assert tokenizer.token_to_id(END_OF_TEXT) == 0
    ids = encode(tokenizer, text)
    assert ids.dtype == torch.long
    assert len(ids) < len(text)
    assert tokenizer.decode(ids.tolist()) == text
    # Byte-level: text it never saw still encodes and decodes exactly.
    unseen = "Zebra ünïcode 🚀\n"
    assert tokenizer.decode(encode(tokenizer, unseen).tolist()) == unseen


def test_split_blocks_holds_out_the_last_tokens() -> None:
    ids = torch.arange(100)
    splits = split_blocks(ids, block_len=10, batch_size=2, holdout_fraction=0.1)
    assert splits.train.shape == (9, 10)
    assert splits.validation.shape == (1, 10)
    assert torch.equal(splits.validation[0], torch.arange(90, 100))
    assert torch.equal(splits.train.flatten(), torch.arange(90))
    dataset = BlockDataset(splits.train)
    assert len(dataset) == 9
    assert torch.equal(dataset[2], torch.arange(20, 30))


@pytest.mark.parametrize(("tokens", "batch_size"), [(100, 10), (15, 1)])
def test_split_blocks_rejects_too_few_blocks(tokens: int, batch_size: int) -> None:
    with pytest.raises(UserError, match=f"its {tokens} tokens make"):
        split_blocks(torch.arange(tokens), block_len=10, batch_size=batch_size, holdout_fraction=0.1)


@pytest.mark.parametrize(("family", "size"), [("gpt2", "huge"), ("bert", "tiny")])
def test_build_model_rejects_an_unknown_model(family: str, size: str) -> None:
    with pytest.raises(ValueError, match=f"unknown model {family}/{size}"):
        build_model(family, size, vocab_size=100, max_seq_len=16)


@pytest.mark.parametrize(("family", "size"), [("gpt2", "tiny"), ("gpt2", "small"), ("llama", "tiny")])
def test_count_parameters_matches_the_familys_estimate(family: str, size: str) -> None:
    shape = model_shape(family, size)
    assert shape is not None
    model = build_model(family, size, vocab_size=1000, max_seq_len=64)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (
        shape.n_layer,
        shape.n_embd,
        shape.n_head,
    )
    counted = count_parameters(model)
    assert counted == pytest.approx(FAMILIES[family].count_params(shape, 1000, 64), rel=0.01)
    # Tied embeddings count once.
    with_duplicates = sum(
        parameter.numel() for _, parameter in model.named_parameters(remove_duplicate=False)
    )
    assert with_duplicates - counted == 1000 * shape.n_embd


def test_the_module_refuses_a_model_without_a_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("gpt2", "tiny", vocab_size=50, max_seq_len=8)
    module = LanguageModel(model, learning_rate=1e-3)
    batch = torch.zeros((2, 8), dtype=torch.long)
    assert torch.isfinite(module.training_step(batch, 0))

    def no_loss(**inputs: torch.Tensor) -> CausalLMOutputWithCrossAttentions:
        return CausalLMOutputWithCrossAttentions(loss=None, logits=torch.zeros((2, 8, 50)))

    monkeypatch.setattr(model, "forward", no_loss)
    with pytest.raises(TypeError, match="no loss"):
        module.training_step(batch, 0)


def test_save_artifacts_expects_the_language_model(trained: Trained, tmp_path: Path) -> None:
    text = "a b c a b c\n" * 20
    tokenizer = train_tokenizer(text, vocab_size=260)
    splits = split_blocks(encode(tokenizer, text), 8, 1, 0.1)
    with pytest.raises(TypeError, match="LanguageModel"):
        training.save_artifacts(
            trained.context, L.LightningModule(), tokenizer, MetricsLog(), splits, 1.0, tmp_path
        )


def not_a_model(shape: ModelShape, vocab_size: int, max_seq_len: int) -> str:
    return "not a model"


@pytest.mark.parametrize("builder", ["tests.test_training:not_a_model", "tests.test_training:SEQ_LEN"])
def test_build_model_rejects_a_builder_that_builds_no_model(
    builder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = ModelFamily(
        name="odd",
        sizes={"tiny": ModelShape(n_layer=1, n_embd=8, n_head=1)},
        builder=builder,
        count_params=gpt2_params,
    )
    monkeypatch.setitem(FAMILIES, "odd", family)
    with pytest.raises(TypeError, match=f"builder {builder} did not return"):
        build_model("odd", "tiny", vocab_size=50, max_seq_len=8)


def test_generate_sample_needs_a_generating_model(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = train_tokenizer("a b c a b c\n" * 20, vocab_size=260)
    validation = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    config = GPT2Config(vocab_size=260, n_positions=64, n_embd=8, n_layer=1, n_head=1)
    with pytest.raises(TypeError, match="GPT2Model cannot generate text"):
        training.generate_sample(GPT2Model(config), tokenizer, validation, 64, seed=0)
    model = GPT2LMHeadModel(config)
    sample = training.generate_sample(model, tokenizer, validation, 64, seed=0)
    assert isinstance(sample, str)
    assert sample == training.generate_sample(model, tokenizer, validation, 64, seed=0)

    def no_ids(**inputs: object) -> dict[str, object]:
        return {"sequences": None}

    monkeypatch.setattr(model, "generate", no_ids)
    with pytest.raises(TypeError, match="returned no token ids"):
        training.generate_sample(model, tokenizer, validation, 64, seed=0)


@pytest.mark.parametrize(
    ("max_seq_len", "prompt_len", "total_len"),
    [(8, 4, 8), (9, 4, 9), (16, 8, 16), (47, 8, 47), (48, 8, 48), (100, 8, 8 + training.SAMPLE_TOKENS)],
)
def test_generate_sample_stays_within_the_context(max_seq_len: int, prompt_len: int, total_len: int) -> None:
    """Prompt plus new tokens fill at most max_seq_len positions: a model with no more positions generates."""
    tokenizer = train_tokenizer("a b c a b c\n" * 20, vocab_size=260)
    validation = torch.arange(1, 2 * max_seq_len + 1).view(2, max_seq_len) % 250 + 1
    config = GPT2Config(vocab_size=260, n_positions=max_seq_len, n_embd=8, n_layer=1, n_head=1)
    model = GPT2LMHeadModel(config)
    positions: list[int] = []

    def note_positions(module: torch.nn.Module, args: tuple[object, ...], output: object) -> None:
        [ids] = args
        assert isinstance(ids, torch.Tensor)
        positions.append(int(ids.max()))

    model.transformer.wpe.register_forward_hook(note_positions)
    sample = training.generate_sample(model, tokenizer, validation, max_seq_len, seed=0)
    # One forward pass per new token (the ids never hit an end of text); the last token is sampled
    # from the logits at the position before it, so the model never sees a position past total_len - 2.
    assert len(positions) == total_len - prompt_len
    assert max(positions) == total_len - 2
    assert sample.startswith(tokenizer.decode(validation[0][:prompt_len].tolist()))


def test_a_loss_curve_without_rows_still_renders(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    plot_loss_curve(MetricsLog(), path, "nothing yet")
    assert path.read_bytes().startswith(b"\x89PNG")


# Object-store roots: what a worker on its own machine does.


def s3_files(bucket: str) -> FileStores:
    return FileStores(Storage(f"{bucket}/corpora"), Storage(f"{bucket}/artifacts"), Storage(f"{bucket}/runs"))


def test_a_run_on_an_object_store_resumes_on_another_machine_from_the_stored_checkpoint(
    trained: Trained, redis_client: redis.Redis, tmp_path: Path, s3_bucket: str
) -> None:
    files = s3_files(s3_bucket)
    files.corpora.upload(trained.corpus_path, trained.corpus_path.name)
    one_epoch = request(trained.corpus_path, num_epochs=1)
    first = context_for(
        redis_client,
        "run-moves",
        one_epoch,
        tmp_path,
        trained.corpus_path,
        cancel_requested=ShutdownAtStep(3),
        files=files,
        cache_root=tmp_path / "machine-a",
    )
    with pytest.raises(SystemExit):
        training.train(first)
    # The hand-back waited for last.ckpt to reach the store; the machine keeps no scratch files.
    assert files.runs.exists("run-moves/checkpoints/last.ckpt")
    assert files.runs.exists("run-moves/splits/validation.pt")
    assert list((tmp_path / "machine-a" / "work").iterdir()) == []
    stored = tmp_path / "stored.ckpt"
    files.runs.download("run-moves/checkpoints/last.ckpt", stored)
    assert torch.load(stored, weights_only=False)["global_step"] == 3

    # Another worker, with a cache of its own, picks the run up where it stopped.
    second = dataclasses.replace(
        first, cancel_requested=lambda: False, cache=FileCache(tmp_path / "machine-b", 10**9)
    )
    training.train(second)
    events = events_of(redis_client, "run-moves")
    resumed = [event.step for event in events[3:] if isinstance(event, TrainProgress)]
    assert resumed[0] == 4
    done = events[-1]
    assert isinstance(done, TrainCompleted)
    assert done.artifact_path == f"{s3_bucket}/artifacts/models/run-moves"
    names = [found.name for found in files.artifacts.files("models/run-moves")]
    assert {"manifest.json", "model.safetensors", "config.json", "loss_curve.png", "logs.jsonl"} <= set(names)
    logged = files.artifacts.read_bytes("models/run-moves/logs.jsonl").decode()
    assert "resuming from the run's last checkpoint in the store" in logged
    # The newest checkpoints reached the store before the run ended.
    files.runs.download("run-moves/checkpoints/last.ckpt", stored)
    assert torch.load(stored, weights_only=False)["global_step"] == max(resumed)
    assert files.runs.exists("run-moves/checkpoints/best.ckpt")
    assert list((tmp_path / "machine-b" / "work").iterdir()) == []


class RedisOutage:
    """A cancel check (asked once per step) that stops the run's Redis at one step, for good, and logs
    a line and notes the time at every step."""

    def __init__(self, service: devstack.Service, client: redis.Redis, down: int) -> None:
        self.service, self.client, self.down = service, client, down
        self.steps: list[float] = []
        self.streamed_before = 0

    def __call__(self) -> bool:
        self.steps.append(time.monotonic())
        if len(self.steps) == self.down:
            self.streamed_before = len(runlog.tail(self.client, "run-outage", 10_000))
            self.service.stop()
        logging.getLogger("tests.outage").info("step %d done", len(self.steps))
        return False


def test_redis_stopped_mid_run_costs_log_lines_not_training_steps(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service, url = devstack.start_redis(tmp_path / "redis")
    # No retries: the reporter's own calls (not what is tested here) fail at once instead of backing off.
    client = redis.Redis.from_url(url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    outage = RedisOutage(service, client, down=3)
    context = context_for(client, "run-outage", request(trained.corpus_path), tmp_path, trained.corpus_path)
    # The writer's client backs off and retries as a worker's does: seconds per line, were it waited for.
    writer = RunLogWriter(redis.Redis.from_url(url, socket_timeout=2), "run-outage", 10_000)
    patient_for_a_second = RunReporter(
        run_id="run-outage",
        user_id=USER_ID,
        holder="worker-a",
        store=RunStore(client),
        bus=EventBus(client, 10_000),
        end_patience_s=1,
    )
    run = dataclasses.replace(
        context,
        reporter=patient_for_a_second,
        log_lines=writer.write,
        cancel_requested=outage,
        progress_interval_s=1e9,
    )
    try:
        # Only recording the result needs Redis: every step, the artifacts and their log came first. Its end
        # is given up after the reporter's patience, left to the lease like a worker that died.
        with caplog.at_level(logging.ERROR, logger="trainer_tasks.reporting"):
            training.train(run)
    finally:
        service.stop()
    assert patient_for_a_second.finished
    assert "its end (completed) not recorded within 1 s" in caplog.text
    dropped = writer.close(timeout_s=2)
    folder = tmp_path / "artifacts" / "models" / "run-outage"
    steps = [row for row in csv.DictReader((folder / "metrics.csv").open()) if row["train_loss"]]
    assert len(outage.steps) == len(steps) > 10
    # A step never waited on Redis (each took milliseconds; a write that waited would take seconds).
    gaps = [later - earlier for earlier, later in itertools.pairwise(outage.steps[3:])]
    assert max(gaps) < 2.0
    assert outage.streamed_before > 0
    # Lines logged while Redis was away were dropped and counted; the worker's own copy has them all.
    logged = [json.loads(line)["message"] for line in (folder / "logs.jsonl").read_text().splitlines()]
    after_outage = [line for line in logged if line.startswith("step ") and int(line.split()[1]) > 3]
    assert len(after_outage) == len(steps) - 3
    assert dropped >= len(after_outage)


def test_a_gpu_request_on_a_worker_without_one_is_the_users_to_fix(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    corpus_path = corpus.write(tmp_path / "corpus.txt", 10, seed=0)
    asks_gpu = dataclasses.replace(request(corpus_path), accelerator="gpu", queue="gpu")
    context = context_for(redis_client, "run-gpu", asks_gpu, tmp_path, corpus_path)
    gpu_none = r"asks for a GPU, but worker training@box-1 \(queue 'gpu'\) has none"
    with pytest.raises(UserError, match=gpu_none):
        training.train(context)
    assert events_of(redis_client, "run-gpu") == []


def test_two_devices_train_as_two_ddp_ranks_reporting_once_from_rank_zero(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    corpus_path = corpus.write(tmp_path / "corpus.txt", SENTENCES, seed=0)
    one = dataclasses.replace(request(corpus_path, num_epochs=1), accelerator="cpu")
    single = context_for(redis_client, "run-one", one, tmp_path / "one", corpus_path)
    training.train(single)
    two = dataclasses.replace(one, devices=2)
    several = context_for(redis_client, "run-two", two, tmp_path / "two", corpus_path)
    training.train(several)
    events = events_of(redis_client, "run-two")
    assert [type(event) for event in events].count(TrainStarted) == 1
    assert [type(event) for event in events].count(TrainCompleted) == 1
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    completed, alone = events[-1], events_of(redis_client, "run-one")[-1]
    assert isinstance(completed, TrainCompleted)
    assert isinstance(alone, TrainCompleted)
    # Each rank sees half the data per step: the same model, close in loss after one epoch.
    assert completed.loss == pytest.approx(alone.loss, rel=0.15)
    assert record_of(redis_client, "run-two").status == "completed"
    assert (artifact_dir(several) / "manifest.json").is_file()


def test_a_rank_that_fails_reports_once_from_rank_zero(redis_client: redis.Redis, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("A corpus of one short line.\n")
    several = dataclasses.replace(request(small), accelerator="cpu", devices=2)
    context = context_for(redis_client, "run-small-ddp", several, tmp_path, small)
    # Every rank raises; the task's process sees the ranks fail, and rank zero has told the user why.
    with pytest.raises(Exception, match="too small"):
        training.train(context)
    record = record_of(redis_client, "run-small-ddp")
    assert (record.status, record.error_kind) == ("failed", "user")
    events = events_of(redis_client, "run-small-ddp")
    assert [type(event) for event in events] == [TrainFailed]


def test_a_failing_rank_other_than_zero_reports_nothing_and_waits_for_rank_zero(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small.txt"
    small.write_text("A corpus of one short line.\n")
    several = dataclasses.replace(request(small), accelerator="cpu", devices=2)
    context = context_for(redis_client, "run-rank-one", several, tmp_path, small)
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")  # run_rank sets them; the test puts them back
    waited: list[float] = []
    monkeypatch.setattr(time, "sleep", waited.append)

    def fails(rank_context: RunContext) -> None:
        raise UserError("the corpus is too small")

    with pytest.raises(UserError, match="too small"):
        distributed.run_rank(1, distributed.plan_for(context), fails)
    assert waited == [distributed.RANK_ZERO_GRACE_S]
    assert events_of(redis_client, "run-rank-one") == []
    assert record_of(redis_client, "run-rank-one").status != "failed"
