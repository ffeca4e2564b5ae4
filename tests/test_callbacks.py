"""trainer_tasks.callbacks: RunGuard and EventCallback inside a real (tiny) Lightning Trainer; scalar()."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import redis
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from schemas.events import TrainFailed, TrainProgress, TrainStarted
from tests.streams import sent_events
from trainer_store.runs import RunRecord, RunStore
from trainer_tasks.artifacts import MetricsLog
from trainer_tasks.callbacks import (
    EventCallback,
    ResumableCheckpoint,
    RunGuard,
    current_lr,
    scalar,
)
from trainer_tasks.errors import LeaseLost, RunCanceled, UserError
from trainer_tasks.events import EventBus
from trainer_tasks.reporting import RunReporter
from trainer_tasks.resources import ResourceSample

RUN_ID = "run-1"
USER_ID = 123456789012345678
SAMPLES = 8
BATCH = 2
STEPS_PER_EPOCH = SAMPLES // BATCH
TOKENS_PER_SAMPLE = 16
LEARNING_RATE = 0.01


class TinyModule(L.LightningModule):
    """A linear regression: a Lightning fit in milliseconds; optionally logs val_loss or diverges."""

    def __init__(
        self, *, validate: bool = True, nan_from_step: int | None = None, nan_validation: bool = False
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.validate = validate
        self.nan_from_step = nan_from_step
        self.nan_validation = nan_validation

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        features, targets = batch
        return functional.mse_loss(self.layer(features), targets)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if self.nan_from_step is not None and self.global_step >= self.nan_from_step:
            return loss * math.nan
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if self.validate:
            loss = self._loss(batch)
            self.log("val_loss", loss * math.nan if self.nan_validation else loss, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SAMPLES, 4, generator=generator)
    targets = torch.randn(SAMPLES, 1, generator=generator)
    return DataLoader(TensorDataset(features, targets), batch_size=BATCH)


def trainer(root: Path, callbacks: Callbacks, epochs: int = 2, sanity_steps: int = 0) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=sanity_steps,
        default_root_dir=root,
        callbacks=[callbacks.guard, callbacks.events],
    )


def fit(trainer: L.Trainer, module: TinyModule) -> None:
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader() if module.validate else None)


class Counter:
    """A clock answering 0.0, 1.0, 2.0, ... one second further on each call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return float(self.calls - 1)


RESOURCES = ResourceSample(main_rss_mb=321, cgroup_usage_mb=512, cgroup_limit_mb=2048, cgroup_pct=25.0)


class CancelAfter:
    """Says "cancel" from its `calls`-th call on."""

    def __init__(self, calls: int) -> None:
        self.calls = 0
        self._after = calls

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self._after


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    store = RunStore(redis_client)
    store.create(run_id=RUN_ID, job_id="job-1", user_id=USER_ID, request={}, now=1.0)
    assert store.claim(RUN_ID, "worker-a", 60, 2.0)
    return store


@pytest.fixture
def reporter(store: RunStore, redis_client: redis.Redis) -> RunReporter:
    return RunReporter(
        run_id=RUN_ID,
        user_id=USER_ID,
        holder="worker-a",
        store=store,
        bus=EventBus(redis_client, 1000),
        clock=lambda: 9.0,
    )


def started() -> TrainStarted:
    return TrainStarted(
        request_id=RUN_ID,
        run_id=RUN_ID,
        user_id=USER_ID,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=2,
        queue="training",
    )


@dataclass(frozen=True)
class Callbacks:
    guard: RunGuard
    events: EventCallback


def callback(
    reporter: RunReporter,
    *,
    interval_s: float = 1e9,
    clock: Callable[[], float] = lambda: 0.0,
    cancel_requested: Callable[[], bool] = lambda: False,
    lease_lost: Callable[[], bool] = lambda: False,
    metrics: MetricsLog | None = None,
) -> Callbacks:
    """The two callbacks as the training wires them: the guard first, then the events."""
    guard = RunGuard(
        RUN_ID, learning_rate=LEARNING_RATE, cancel_requested=cancel_requested, lease_lost=lease_lost
    )
    events = EventCallback(
        reporter,
        started=started(),
        metrics=metrics or MetricsLog(),
        resources=lambda: RESOURCES,
        interval_s=interval_s,
        samples_per_step=BATCH,
        tokens_per_sample=TOKENS_PER_SAMPLE,
        clock=clock,
    )
    return Callbacks(guard, events)


def progress_events(client: redis.Redis) -> list[TrainProgress]:
    return [event for event in sent_events(client) if isinstance(event, TrainProgress)]


def record_of(store: RunStore) -> RunRecord:
    record = store.get(RUN_ID)
    assert record is not None
    return record


def test_a_fit_sends_started_then_progress_and_ends_with_its_validation_loss(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    module, metrics = TinyModule(), MetricsLog()
    callbacks = callback(reporter, metrics=metrics)
    run = trainer(tmp_path, callbacks)
    fit(run, module)
    events = sent_events(redis_client)
    # The completed event is the training's to send, once the artifacts are in the store.
    assert [type(event) for event in events] == [TrainStarted, TrainProgress, TrainProgress]
    assert [event.seq for event in events] == [1, 2, 3]
    first, second = events[1], events[2]
    assert isinstance(first, TrainProgress)
    assert isinstance(second, TrainProgress)
    assert [(first.epoch, first.step), (second.epoch, second.step)] == [(1, 4), (2, 8)]
    assert first.total_epochs == second.total_epochs == 2
    assert math.isfinite(first.loss)
    # The clock never moved, so no rate can be computed.
    assert first.samples_per_sec is None
    assert first.tokens_per_sec is None
    # Validation runs before the epoch's end, so the epoch's progress carries its val_loss.
    assert first.val_loss is not None
    assert second.val_loss is not None
    val_loss = scalar(run.callback_metrics["val_loss"])
    assert val_loss is not None
    assert second.val_loss == pytest.approx(val_loss)
    assert callbacks.guard.final_loss(run) == pytest.approx(val_loss)
    # Progress carries the optimizer's learning rate and the sampled resources.
    assert (first.lr, first.main_rss_mb, first.cgroup_usage_mb) == (LEARNING_RATE, 321, 512)
    assert (first.cgroup_limit_mb, first.cgroup_pct) == (2048, 25.0)
    # The metrics log has every step's training loss and each epoch's validation loss.
    train_rows = [row for row in metrics.rows if row.train_loss is not None]
    val_rows = [row for row in metrics.rows if row.val_loss is not None]
    expected_rows = [(1 + (step - 1) // STEPS_PER_EPOCH, step) for step in range(1, 9)]
    assert [(row.epoch, row.step) for row in train_rows] == expected_rows
    assert all(row.lr == LEARNING_RATE for row in train_rows)
    assert [(row.epoch, row.step) for row in val_rows] == [(1, 4), (2, 8)]
    assert val_rows[-1].val_loss == pytest.approx(val_loss)
    assert train_rows[-1].train_loss == second.loss
    assert record_of(store).status == "running"


def test_a_huge_interval_sends_one_progress_per_epoch(
    tmp_path: Path, reporter: RunReporter, redis_client: redis.Redis
) -> None:
    fit(trainer(tmp_path, callback(reporter, interval_s=1e9, clock=Counter()), epochs=3), TinyModule())
    assert [(event.epoch, event.step) for event in progress_events(redis_client)] == [(1, 4), (2, 8), (3, 12)]


def test_a_zero_interval_sends_progress_every_step_and_at_each_epoch_end(
    tmp_path: Path, reporter: RunReporter, redis_client: redis.Redis
) -> None:
    fit(trainer(tmp_path, callback(reporter, interval_s=0.0)), TinyModule())
    steps = [event.step for event in progress_events(redis_client)]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]


def test_progress_is_throttled_by_time_and_measures_the_rate(
    tmp_path: Path, reporter: RunReporter, redis_client: redis.Redis
) -> None:
    # The clock reads 0 at the start, then 1, 2, 3 at the batch ends: step 3 is the first 2.5 s later.
    clock = Counter()
    fit(trainer(tmp_path, callback(reporter, interval_s=2.5, clock=clock), epochs=1), TinyModule())
    progress = progress_events(redis_client)
    assert [event.step for event in progress] == [3, 4]
    # Step 3 sent at t=4 (3 steps in 4 s); the epoch's end at t=6 (1 step in 2 s); 2 samples a step.
    assert [event.samples_per_sec for event in progress] == [1.5, 1.0]
    assert [event.tokens_per_sec for event in progress] == [1.5 * TOKENS_PER_SAMPLE, 1.0 * TOKENS_PER_SAMPLE]
    # 4 steps in all: one left after step 3 at 0.75 steps/s, none at the end.
    assert [event.eta_s for event in progress] == [pytest.approx(4 / 3), 0.0]


def test_an_epoch_end_right_after_a_progress_reports_no_rate(
    tmp_path: Path, reporter: RunReporter, redis_client: redis.Redis
) -> None:
    fit(trainer(tmp_path, callback(reporter, interval_s=0.0, clock=Counter()), epochs=1), TinyModule())
    progress = progress_events(redis_client)
    assert [event.step for event in progress] == [1, 2, 3, 4, 4]
    assert all(event.samples_per_sec is not None for event in progress[:-1])
    # No step since the last progress: no rate and no estimate, rather than a rate of zero.
    assert (progress[-1].samples_per_sec, progress[-1].tokens_per_sec, progress[-1].eta_s) == (
        None,
        None,
        None,
    )


def test_a_non_finite_training_loss_fails_the_run_as_the_users(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    run = trainer(tmp_path, callback(reporter))
    with pytest.raises(UserError, match="lower the learning rate") as raised:
        fit(run, TinyModule(nan_from_step=2))
    assert "nan" in str(raised.value)
    assert "at step 3" in str(raised.value)
    events = sent_events(redis_client)
    assert [type(event) for event in events] == [TrainStarted, TrainFailed]
    failed = events[-1]
    assert isinstance(failed, TrainFailed)
    assert (failed.error_kind, failed.status) == ("user", "failed")
    assert f"it was {LEARNING_RATE:g}" in failed.message
    record = record_of(store)
    assert (record.status, record.error_kind, record.message) == ("failed", "user", failed.message)


def test_no_validation_loss_at_the_end_is_ours_not_the_users(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    callbacks = callback(reporter)
    run = trainer(tmp_path, callbacks, epochs=1)
    fit(run, TinyModule(validate=False))
    with pytest.raises(RuntimeError, match="without a validation loss"):
        callbacks.guard.final_loss(run)


def test_a_cancel_request_stops_training_and_ends_canceled(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    cancel = CancelAfter(calls=2)
    callbacks = callback(reporter, cancel_requested=cancel)
    run = trainer(tmp_path, callbacks, epochs=3)
    fit(run, TinyModule())
    # Asked once per step; the second step's answer stops the fit at the next check.
    assert run.global_step == 2
    assert cancel.calls == 2
    assert callbacks.guard.canceled
    with pytest.raises(RunCanceled):
        callbacks.guard.final_loss(run)
    # The runner reports the cancel (it catches what final_loss raises).
    assert [type(event) for event in sent_events(redis_client)] == [TrainStarted, TrainProgress]
    assert record_of(store).status == "running"


def test_a_shutdown_is_not_reported_as_a_failure(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    callbacks = callback(reporter)
    run, module, events = trainer(tmp_path, callbacks), TinyModule(), callbacks.events
    events.on_exception(run, module, SystemExit(0))
    assert reporter.finished is False
    assert sent_events(redis_client) == []
    assert record_of(store).status == "running"
    events.on_exception(run, module, OSError("disk full at /secret"))
    [failed] = sent_events(redis_client)
    assert isinstance(failed, TrainFailed)
    assert failed.error_kind == "system"
    assert "OSError" in failed.message
    assert "/secret" not in failed.message


def test_a_lost_lease_stops_training_and_reports_nothing(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    lost = CancelAfter(calls=3)
    metrics = MetricsLog()
    run = trainer(tmp_path, callback(reporter, lease_lost=lost, metrics=metrics), epochs=3)
    with pytest.raises(LeaseLost, match="run run-1: lease lost at step 3"):
        fit(run, TinyModule())
    # Asked once per step; the step that finds the lease gone is not logged as this executor's.
    assert lost.calls == 3
    assert [row.step for row in metrics.rows if row.train_loss is not None] == [1, 2]
    # The executor that took the run over reports it: no failed event, no final status, here.
    assert [type(event) for event in sent_events(redis_client)] == [TrainStarted]
    assert reporter.finished is False
    assert record_of(store).status == "running"


def test_on_exception_reports_a_lost_lease_as_nothing(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    callbacks = callback(reporter)
    run, module = trainer(tmp_path, callbacks), TinyModule()
    callbacks.events.on_exception(run, module, LeaseLost("taken over"))
    assert reporter.finished is False
    assert sent_events(redis_client) == []
    assert record_of(store).status == "running"


@pytest.mark.parametrize(
    ("exception", "saves"),
    [(LeaseLost("taken over"), False), (SystemExit(1), True), (RuntimeError("boom"), True)],
)
def test_the_resumable_checkpoint_saves_unless_the_lease_was_lost(
    exception: BaseException, saves: bool, tmp_path: Path
) -> None:
    checkpoint = ResumableCheckpoint(dirpath=tmp_path / "checkpoints", filename="last")
    run = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[checkpoint],
    )
    module = TinyModule()
    run.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    # A fit that ends normally leaves nothing: the callback saves only when training stops early.
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    checkpoint.on_exception(run, module, exception)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() is saves
    # ModelCheckpoint's last.ckpt has the same name: the end of a fit never removes it.
    checkpoint.teardown(run, module, "fit")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() is saves


class NotRankZero(L.Trainer):
    """A trainer in a process other than rank zero, as in a multi-device run."""

    @property
    def is_global_zero(self) -> bool:
        return False


def test_only_rank_zero_reports_started(
    tmp_path: Path, reporter: RunReporter, store: RunStore, redis_client: redis.Redis
) -> None:
    events, module = callback(reporter).events, TinyModule()
    other = NotRankZero(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[])
    events.on_train_start(other, module)
    assert sent_events(redis_client) == []
    events.on_train_start(trainer(tmp_path, callback(reporter)), module)
    assert [type(event) for event in sent_events(redis_client)] == [TrainStarted]


def test_the_sanity_check_is_not_a_validation_result(tmp_path: Path, reporter: RunReporter) -> None:
    metrics = MetricsLog()
    fit(trainer(tmp_path, callback(reporter, metrics=metrics), epochs=1, sanity_steps=1), TinyModule())
    assert [row.step for row in metrics.rows if row.val_loss is not None] == [4]


def test_current_lr(tmp_path: Path, reporter: RunReporter) -> None:
    fresh = trainer(tmp_path, callback(reporter))
    assert current_lr(fresh) is None
    layer = torch.nn.Linear(2, 1)
    fresh.strategy.optimizers = [torch.optim.SGD(layer.parameters(), lr=0.25)]
    assert current_lr(fresh) == 0.25
    fresh.strategy.optimizers = [torch.optim.SGD(layer.parameters(), lr=torch.tensor(0.25))]
    assert current_lr(fresh) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.tensor(2.5), 2.5),
        (torch.tensor([1.5]), 1.5),
        (torch.tensor(3.0, requires_grad=True) * 1, 3.0),
        (torch.tensor([1.0, 2.0]), None),
        ({"loss": torch.tensor(0.75)}, 0.75),
        ({"loss": 4}, 4.0),
        ({"other": torch.tensor(1.0)}, None),
        (3, 3.0),
        (2.25, 2.25),
        (math.inf, math.inf),
        (True, None),
        (False, None),
        (None, None),
        ("1.5", None),
    ],
)
def test_scalar(value: object, expected: float | None) -> None:
    result = scalar(value)
    assert result == expected
    assert result is None or type(result) is float


def test_scalar_keeps_nan() -> None:
    result = scalar(torch.tensor(math.nan))
    assert result is not None
    assert math.isnan(result)


def test_an_epoch_end_before_any_step_sends_no_progress(
    tmp_path: Path, reporter: RunReporter, redis_client: redis.Redis
) -> None:
    # A run resumed from a checkpoint taken at an epoch's end reaches that hook with no loss yet.
    callbacks = callback(reporter)
    callbacks.events.on_train_epoch_end(trainer(tmp_path, callbacks), TinyModule())
    assert sent_events(redis_client) == []


def test_a_validation_loss_that_is_not_finite_is_the_users(tmp_path: Path, reporter: RunReporter) -> None:
    callbacks = callback(reporter)
    run = trainer(tmp_path, callbacks, epochs=1)
    fit(run, TinyModule(nan_validation=True))
    with pytest.raises(UserError, match="validation loss is nan: lower the learning rate"):
        callbacks.guard.final_loss(run)


def test_metric_rows_round_trip_through_a_checkpoints_state(reporter: RunReporter) -> None:
    logged = MetricsLog()
    logged.train(1, 1, 2.5, 1e-3)
    logged.train(2, 1, math.nan, None)
    logged.validation(2, 1, 2.25)
    state = callback(reporter, metrics=logged).events.state_dict()
    resumed = MetricsLog()
    resumed.validation(9, 9, 9.0)  # replaced: the checkpoint's rows are the run's history to its step
    callback(reporter, metrics=resumed).events.load_state_dict(state)
    # Compared as text: a NaN loss (a step without one) equals no other NaN.
    assert repr(resumed.rows) == repr(logged.rows)
    assert len(resumed.rows) == 3


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("rows", "metric rows must be a list"),
        ([[1, 1]], "metric row must be a mapping"),
        ([{"step": 1.0, "epoch": 1}], "needs an integer step and epoch"),
        ([{"step": 1, "epoch": None}], "needs an integer step and epoch"),
        ([{"step": 1, "epoch": 1, "val_loss": "2.5"}], "holds '2.5' where a float belongs"),
    ],
)
def test_metric_rows_a_checkpoint_holds_in_another_shape_are_refused(state: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        MetricsLog().restore(state)
