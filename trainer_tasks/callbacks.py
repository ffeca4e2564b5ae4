"""Lightning callbacks that turn training hooks into run events; all I/O goes through the reporter."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from schemas.events import TrainCompleted, TrainProgress, TrainStarted
from trainer_tasks.errors import RunCanceled, UserError
from trainer_tasks.reporting import RunReporter

SaveArtifacts = Callable[[L.LightningModule], str]


def scalar(value: object) -> float | None:
    """A float from what Lightning hands over (a tensor, a number, a dict with "loss"), else None."""
    if isinstance(value, Mapping):
        value = value.get("loss")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class EventCallback(L.Callback):
    """started once, progress at most every `interval_s` plus once per epoch, then completed or failed."""

    def __init__(
        self,
        reporter: RunReporter,
        *,
        started: TrainStarted,
        save_artifacts: SaveArtifacts,
        interval_s: float,
        samples_per_step: int,
        tokens_per_sample: int,
        learning_rate: float,
        cancel_requested: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reporter = reporter
        self._started = started
        self._save_artifacts = save_artifacts
        self._interval_s = interval_s
        self._samples_per_step = samples_per_step
        self._tokens_per_sample = tokens_per_sample
        self._learning_rate = learning_rate
        self._cancel_requested = cancel_requested
        self._clock = clock
        self._last_loss = math.nan
        self._last_sent_at = 0.0
        self._last_sent_step = 0
        self._canceled = False

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_sent_at = self._clock()
        self._last_sent_step = trainer.global_step
        self._reporter.started(self._started)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        loss = scalar(outputs)
        if loss is None or not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {trainer.global_step}: "
                f"lower the learning rate (it was {self._learning_rate:g})"
            )
        self._last_loss = loss
        if self._cancel_requested():
            self._canceled = True
            trainer.should_stop = True
        if self._clock() - self._last_sent_at >= self._interval_s:
            self._send_progress(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._send_progress(trainer)

    @rank_zero_only
    def _send_progress(self, trainer: L.Trainer) -> None:
        now = self._clock()
        elapsed = now - self._last_sent_at
        steps = trainer.global_step - self._last_sent_step
        samples_per_sec = steps * self._samples_per_step / elapsed if elapsed > 0 else None
        val_loss = scalar(trainer.callback_metrics.get("val_loss"))
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
                val_loss=val_loss if val_loss is not None and math.isfinite(val_loss) else None,
            )
        )
        self._last_sent_at, self._last_sent_step = now, trainer.global_step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._canceled:
            raise RunCanceled
        val_loss = scalar(trainer.callback_metrics.get("val_loss"))
        if val_loss is None or not math.isfinite(val_loss):
            raise UserError(
                f"the validation loss is {val_loss}: lower the learning rate ({self._learning_rate:g})"
            )
        artifact_path = self._save_artifacts(pl_module)
        if trainer.is_global_zero:
            self._reporter.completed(
                TrainCompleted(
                    request_id=self._reporter.run_id,
                    run_id=self._reporter.run_id,
                    user_id=self._reporter.user_id,
                    loss=val_loss,
                    perplexity=math.exp(val_loss),
                    artifact_path=artifact_path,
                )
            )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A SystemExit is a shutdown, not a failure: the runner hands the run back to the queue.
        if isinstance(exception, Exception):
            self._reporter.failed_with(exception)
