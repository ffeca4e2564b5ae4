"""A run's take-away files beside the model (metrics.csv, loss_curve.png, manifest.json) and its log."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The object API renders without pyplot's global state or a display.
from matplotlib.figure import Figure


@dataclass(frozen=True)
class MetricRow:
    step: int
    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None


@dataclass
class MetricsLog:
    """Losses by step, filled by the training callback, written out with the artifacts."""

    rows: list[MetricRow] = field(default_factory=list)

    def train(self, step: int, epoch: int, loss: float, lr: float | None) -> None:
        self.rows.append(MetricRow(step=step, epoch=epoch, train_loss=loss, lr=lr))

    def validation(self, step: int, epoch: int, loss: float) -> None:
        self.rows.append(MetricRow(step=step, epoch=epoch, val_loss=loss))

    def to_state(self) -> list[dict[str, int | float | None]]:
        """The rows as plain data, for a checkpoint."""
        return [asdict(row) for row in self.rows]

    def restore(self, state: object) -> None:
        """The rows a checkpoint kept, in place of any: what the attempts before a resume logged."""
        if not isinstance(state, list):
            raise TypeError("a checkpoint's metric rows must be a list")
        self.rows[:] = [_metric_row(item) for item in state]


def _metric_row(item: object) -> MetricRow:
    if not isinstance(item, dict):
        raise TypeError("a checkpoint's metric row must be a mapping")
    step, epoch = item.get("step"), item.get("epoch")
    if not isinstance(step, int) or not isinstance(epoch, int):
        raise TypeError("a checkpoint's metric row needs an integer step and epoch")
    train_loss, val_loss, lr = (_optional_float(item.get(name)) for name in ("train_loss", "val_loss", "lr"))
    return MetricRow(step=step, epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=lr)


def _optional_float(value: object) -> float | None:
    if value is None or isinstance(value, float):
        return value
    raise TypeError(f"a checkpoint's metric row holds {value!r} where a float belongs")


def write_metrics_csv(log: MetricsLog, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "train_loss", "val_loss", "lr"])
        writer.writeheader()
        for row in log.rows:
            writer.writerow({name: "" if value is None else value for name, value in asdict(row).items()})


def plot_loss_curve(log: MetricsLog, path: Path, title: str) -> None:
    train = [(row.step, row.train_loss) for row in log.rows if row.train_loss is not None]
    validation = [(row.step, row.val_loss) for row in log.rows if row.val_loss is not None]
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if validation:
        axes.plot(*zip(*validation, strict=True), label="validation", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_manifest(path: Path, manifest: dict[str, object]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


class JsonLinesHandler(logging.Handler):
    """Log records as one JSON object per line (ts, level, logger, message), to a file and to `also`."""

    def __init__(self, path: Path, also: Callable[[str], None]) -> None:
        super().__init__(level=logging.INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")
        self._also = also

    def emit(self, record: logging.LogRecord) -> None:
        line = json.dumps(
            {
                "ts": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )
        self._handle.write(line + "\n")
        self._handle.flush()
        self._also(line)

    def close(self) -> None:
        self._handle.close()
        super().close()


@contextmanager
def captured_logs(path: Path, also: Callable[[str], None]) -> Iterator[None]:
    """What the worker logs during a run (one run per pool process), whole in a local file and line by
    line to `also` (the run's stream in Redis, which may drop lines rather than wait)."""
    handler = JsonLinesHandler(path, also)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(min(previous, logging.INFO) if previous else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
