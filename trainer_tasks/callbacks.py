"""Lightning callbacks: one guards the run, one turns training hooks into events; I/O is injected."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from schemas.events import TrainProgress, TrainStarted
from trainer_tasks.artifacts import MetricsLog
from trainer_tasks.errors import LeaseLost, RunCanceled, TimeLimitReached, UserError
from trainer_tasks.reporting import RunReporter
from trainer_tasks.resources import ResourceSample


def scalar(value: object) -> float | None:
    """A float from what Lightning hands over (a tensor, a number, a dict with "loss"), else None."""
    if isinstance(value, Mapping):
        value = value.get("loss")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def current_lr(trainer: L.Trainer) -> float | None:
    if not trainer.optimizers:
        return None
    lr: object = trainer.optimizers[0].param_groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def total_steps(trainer: L.Trainer) -> int | None:
    estimated: object = trainer.estimated_stepping_batches
    return int(estimated) if isinstance(estimated, (int, float)) and math.isfinite(estimated) else None


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class RunGuard(L.Callback):
    """Stops a run that must not go on: a loss that is no longer finite, a lost lease, a cancel request,
    a run that has trained as long as a run may.

    Put it before the callbacks that record a step, so a step it refuses is recorded by none of them.
    """

    def __init__(
        self,
        run_id: str,
        *,
        learning_rate: float,
        cancel_requested: Callable[[], bool],
        lease_lost: Callable[[], bool],
        over_time_limit: Callable[[], bool] = lambda: False,
        max_run_s: float = 24 * 3600.0,
    ) -> None:
        self._run_id = run_id
        self._learning_rate = learning_rate
        self._cancel_requested = cancel_requested
        self._lease_lost = lease_lost
        self._over_time_limit = over_time_limit
        self._max_run_s = max_run_s
        self.canceled = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        loss = scalar(outputs)
        if loss is None or not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {trainer.global_step}: "
                f"lower the learning rate (it was {self._learning_rate:g})"
            )
        if self._lease_lost():
            raise LeaseLost(f"run {self._run_id}: lease lost at step {trainer.global_step}")
        if self._cancel_requested():
            self.canceled = True
            trainer.should_stop = True
        elif self._over_time_limit():
            # Raised from a hook: ResumableCheckpoint saves last.ckpt, the events callback reports it.
            raise TimeLimitReached(
                f"the run reached the training time limit of {self._max_run_s:g} s (APP__MAX_RUN_S) "
                f"at step {trainer.global_step}; its last checkpoint is kept"
            )

    def final_loss(self, trainer: L.Trainer) -> float:
        """The validation loss a finished fit ended with; raises when the run must not complete."""
        if self.canceled:
            raise RunCanceled
        val_loss = scalar(trainer.callback_metrics.get("val_loss"))
        if val_loss is None:
            raise RuntimeError("training ended without a validation loss")
        if not math.isfinite(val_loss):
            raise UserError(
                f"the validation loss is {val_loss}: lower the learning rate ({self._learning_rate:g})"
            )
        return val_loss


class EventCallback(L.Callback):
    """Turns hooks into events: started once, progress at most every `interval_s` plus once per epoch,
    failed when training raises; it records each step's losses in `metrics` for the artifacts."""

    def __init__(
        self,
        reporter: RunReporter,
        *,
        started: TrainStarted,
        metrics: MetricsLog,
        interval_s: float,
        samples_per_step: int,
        tokens_per_sample: int,
        resources: Callable[[], ResourceSample],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reporter = reporter
        self._started = started
        self._metrics = metrics
        self._interval_s = interval_s
        self._samples_per_step = samples_per_step
        self._tokens_per_sample = tokens_per_sample
        self._resources = resources
        self._clock = clock
        self._last_loss = math.nan
        self._last_sent_at = 0.0
        self._last_sent_step = 0

    def state_dict(self) -> dict[str, object]:
        # In every checkpoint: a resumed run's metrics.csv and loss curve begin with its earlier attempts.
        return {"metric_rows": self._metrics.to_state()}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self._metrics.restore(state_dict.get("metric_rows", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_sent_at = self._clock()
        self._last_sent_step = trainer.global_step
        if trainer.is_global_zero:
            self._reporter.started(self._started)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        loss = scalar(outputs)
        self._last_loss = math.nan if loss is None else loss  # RunGuard has stopped a run without one
        self._metrics.train(
            trainer.global_step, trainer.current_epoch + 1, self._last_loss, current_lr(trainer)
        )
        if self._clock() - self._last_sent_at >= self._interval_s:
            self._send_progress(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = finite_or_none(scalar(trainer.callback_metrics.get("val_loss")))
        if val_loss is not None and not trainer.sanity_checking:
            # Within fit the epoch being trained; after it (a run resumed past its last epoch is measured
            # again) the epochs already done.
            fitting = trainer.state.fn == TrainerFn.FITTING
            epoch = trainer.current_epoch + 1 if fitting else trainer.current_epoch
            self._metrics.validation(trainer.global_step, epoch, val_loss)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if math.isfinite(self._last_loss):  # nothing trained yet in this attempt (a resume at an epoch's end)
            self._send_progress(trainer)

    @rank_zero_only
    def _send_progress(self, trainer: L.Trainer) -> None:
        now = self._clock()
        elapsed = now - self._last_sent_at
        steps = trainer.global_step - self._last_sent_step
        steps_per_sec = steps / elapsed if elapsed > 0 and steps > 0 else None
        samples_per_sec = steps_per_sec * self._samples_per_step if steps_per_sec else None
        total = total_steps(trainer)
        eta_s = (total - trainer.global_step) / steps_per_sec if steps_per_sec and total else None
        resources = self._resources()
        self._reporter.progress(
            TrainProgress(
                request_id=self._reporter.run_id,
                run_id=self._reporter.run_id,
                user_id=self._reporter.user_id,
                epoch=trainer.current_epoch + 1,
                total_epochs=trainer.max_epochs or 1,
                step=trainer.global_step,
                loss=self._last_loss,
                samples_per_sec=samples_per_sec,
                tokens_per_sec=samples_per_sec * self._tokens_per_sample if samples_per_sec else None,
                eta_s=max(0.0, eta_s) if eta_s is not None else None,
                val_loss=finite_or_none(scalar(trainer.callback_metrics.get("val_loss"))),
                lr=current_lr(trainer),
                main_rss_mb=resources.main_rss_mb,
                cgroup_usage_mb=resources.cgroup_usage_mb,
                cgroup_limit_mb=resources.cgroup_limit_mb,
                cgroup_pct=resources.cgroup_pct,
            )
        )
        self._last_sent_at, self._last_sent_step = now, trainer.global_step

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A SystemExit is a shutdown, not a failure: the runner hands the run back to the queue.
        # A lost lease means another executor owns the run and its reporting.
        if isinstance(exception, Exception) and not isinstance(exception, LeaseLost):
            self._reporter.failed_with(exception)


class ResumableCheckpoint(OnExceptionCheckpoint):
    """Saves `last.ckpt` when training stops early, so a redelivery resumes there.

    Not when the lease was lost: the executor that took the run over writes that file now.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, LeaseLost):
            super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Keeps the file: ModelCheckpoint's `last.ckpt` has the same name, and a run's checkpoints stay
        with its other working files until the run's record expires."""
