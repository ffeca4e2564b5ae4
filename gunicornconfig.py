"""gunicorn's configuration for the Procfile's web line: Prometheus metrics shared by its worker processes."""

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set before any worker imports prometheus_client, which picks its multiprocess mode at import.
_made_here = not os.environ.get(MULTIPROC_ENV)
if _made_here:
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="trainer-metrics-")
METRICS_DIR = Path(os.environ[MULTIPROC_ENV])


def on_starting(server: object) -> None:
    """Samples of an earlier server in the same folder are not this one's: start from nothing."""
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    for stale in METRICS_DIR.glob("*.db"):
        stale.unlink()


def child_exit(server: object, worker: object) -> None:
    """A worker that exits (or is killed and replaced) leaves its counters, not its live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(getattr(worker, "pid", 0), str(METRICS_DIR))


def on_exit(server: object) -> None:
    if _made_here:
        shutil.rmtree(METRICS_DIR, ignore_errors=True)
