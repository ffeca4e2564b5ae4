"""Following a run from a terminal: a live progress bar fed by the run's events, then how it ended."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from schemas.events import (
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    progress_fraction,
)
from trainer_client.client import RunInfo, TrainerClient

# The bar counts thousandths of the run.
BAR_TOTAL = 1000
# Exit statuses, as the rest of the command has them; Ctrl-C that only detaches is the shell's 128 + SIGINT.
SUCCESS = 0
RUN_UNSUCCESSFUL = 1
DETACHED = 130


@dataclass
class Followed:
    """What the events said so far: where to resume, when training began, and how it ended."""

    last_id: str | None = None
    started_ts: float | None = None
    total_epochs: int = 0
    final: TrainCompleted | TrainFailed | None = None


def stats(event: TrainProgress) -> str:
    parts = [f"step {event.step}", f"loss {event.loss:.4f}"]
    if event.val_loss is not None:
        parts.append(f"val {event.val_loss:.4f}")
    if event.tokens_per_sec is not None:
        parts.append(f"{event.tokens_per_sec:,.0f} tok/s")
    if event.eta_s is not None:
        parts.append(f"ETA {duration(event.eta_s)}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def show(event: TrainEvent | NotAnEvent, state: Followed, bar: Progress, task: TaskID) -> None:
    """One event on the bar: the start sets the epochs, progress moves it, the end fills it or stops it;
    evaluations and what could not be read change nothing."""
    if isinstance(event, TrainStarted):
        state.started_ts = event.ts
        state.total_epochs = event.total_epochs
        bar.update(task, description=f"epoch 1/{event.total_epochs}", stats="started")
    elif isinstance(event, TrainProgress):
        done = round(progress_fraction(event, state.started_ts) * BAR_TOTAL)
        bar.update(
            task, completed=done, description=f"epoch {event.epoch}/{event.total_epochs}", stats=stats(event)
        )
    elif isinstance(event, TrainCompleted):
        state.final = event
        bar.update(task, completed=BAR_TOTAL, stats=f"loss {event.loss:.4f}  done")
    elif isinstance(event, TrainFailed):
        state.final = event
        bar.update(task, stats=event.status)


def follow_events(api: TrainerClient, run_id: str, state: Followed, console: Console) -> None:
    """Draw the run's events until its stream ends; resumes after `state.last_id` when there is one."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("queued", total=BAR_TOTAL, stats="waiting for a worker")
        for run_event in api.events(run_id, after=state.last_id):
            state.last_id = run_event.entry_id
            show(run_event.event, state, bar, task)


def follow_run(
    api: TrainerClient, run_id: str, console: Console, ask_cancel: Callable[[], bool] | None
) -> int:
    """Follow to the end and print the outcome; the exit status. Ctrl-C asks `ask_cancel` (None: nobody to
    ask, so only detach): yes cancels the run and keeps following it to its end, no detaches."""
    state = Followed()
    while True:
        try:
            follow_events(api, run_id, state, console)
            break
        except KeyboardInterrupt:
            if ask_cancel is None or not ask_cancel():
                console.print(f"detached; the run goes on: trainer status {run_id}")
                return DETACHED
            api.cancel(run_id)
            console.print(f"cancellation of run {run_id} requested")
    # The terminal event says how it ended; when the events missed it (they are best-effort), the record.
    return outcome(state.final or api.run(run_id), console)


def outcome(end: TrainCompleted | TrainFailed | RunInfo, console: Console) -> int:
    """The final metrics, the sample and where the model is; or why the run did not complete."""
    if isinstance(end, TrainFailed):
        console.print(f"run {end.run_id} {end.status} ({end.error_kind} error): {end.message}")
        return RUN_UNSUCCESSFUL
    if isinstance(end, RunInfo) and end.status != "completed":
        console.print(f"run {end.run_id} {end.status}: {end.message}")
        return RUN_UNSUCCESSFUL if end.status in ("failed", "canceled") else SUCCESS
    table = Table.grid(padding=(0, 2))
    table.add_row("run", end.run_id)
    table.add_row("status", "completed")
    if end.loss is not None:
        table.add_row("loss", f"{end.loss:.4f}")
    if end.perplexity is not None:
        table.add_row("perplexity", f"{end.perplexity:.3f}")
    if isinstance(end, TrainCompleted) and end.params is not None:
        table.add_row("parameters", f"{end.params:,}")
    if isinstance(end, TrainCompleted) and end.duration_s is not None:
        table.add_row("duration", duration(end.duration_s))
    table.add_row("artifacts", end.artifact_path or "")
    table.add_row("download", f"trainer download {end.run_id}")
    console.print(table)
    if isinstance(end, TrainCompleted) and end.sample:
        console.print("sample:")
        console.print(end.sample)
    return SUCCESS
