"""One run on several devices: a process per device, started by spawn, each one DDP rank of the run.

Lightning's own launchers do not fit a Celery task: its default DDP launcher runs the command line
again (the Celery worker), and its spawn launcher pickles the Trainer with the run's callbacks, which
hold Redis clients, threads and locks. Here each rank gets plain data and builds its own clients;
rank zero alone records and publishes (the callbacks and the artifacts check for it).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from torch.multiprocessing.spawn import start_processes

from schemas.api import TrainRequest
from trainer_store.cache import FileCache
from trainer_store.layout import FileStores
from trainer_store.runlog import RunLogWriter
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_store.storage import Storage
from trainer_tasks.events import EventBus
from trainer_tasks.reporting import RunReporter
from trainer_tasks.runner import RunContext

RANK_ENV = "LOCAL_RANK"  # set in each rank's process: Lightning then launches nothing itself


@dataclass(frozen=True)
class RankPlan:
    """What every rank needs, as plain data: a spawned process receives only what pickles."""

    run_id: str
    holder: str  # the task's lease holder: rank zero records the run's end as it
    request: TrainRequest
    queue: str
    worker: str
    torch_threads: int
    progress_interval_s: float
    checkpoint_interval_s: float
    max_run_s: float
    settings: Settings
    roots: tuple[str, str, str]  # corpora, artifacts, runs
    cache_root: Path
    cache_max_bytes: int
    port: int


# How long a failing rank other than zero waits before its failure stops the run's other ranks.
RANK_ZERO_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def plan_for(context: RunContext) -> RankPlan:
    files = context.files
    return RankPlan(
        run_id=context.run_id,
        holder=context.reporter.holder,
        request=context.request,
        queue=context.queue,
        worker=context.worker,
        torch_threads=max(1, context.torch_threads // context.request.devices),
        progress_interval_s=context.progress_interval_s,
        checkpoint_interval_s=context.checkpoint_interval_s,
        max_run_s=context.max_run_s,
        settings=context.settings,
        roots=(files.corpora.url(), files.artifacts.url(), files.runs.url()),
        cache_root=context.cache.root,
        cache_max_bytes=context.cache.max_bytes,
        port=free_port(),
    )


def launch(context: RunContext, train: Callable[[RunContext], None]) -> None:
    """Train on request.devices processes and wait for them; `train` must be a module-level function."""
    plan = plan_for(context)
    start_processes(run_rank, args=(plan, train), nprocs=context.request.devices, start_method="spawn")


def run_rank(rank: int, plan: RankPlan, train: Callable[[RunContext], None]) -> None:
    """One rank: its own clients, the run's context, then the same training as on one device."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(plan.port),
        WORLD_SIZE=str(plan.request.devices),
        NODE_RANK="0",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    settings = plan.settings
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
    store = RunStore(client)
    record = store.get(plan.run_id)
    reporter = RunReporter(
        run_id=plan.run_id,
        user_id=plan.request.user_id,
        holder=plan.holder,
        store=store,
        bus=EventBus(client, settings.events_stream_maxlen),
        last_seq=record.last_seq if record else 0,
    )
    log_writer = RunLogWriter(client, plan.run_id, settings.log_stream_maxlen)
    # Measured from the rank's start, as the task measures it from the claim.
    deadline = time.monotonic() + plan.max_run_s - (record.train_s if record else 0.0)
    corpora, artifacts, runs = (Storage(root, timeout_s=settings.store_timeout_s) for root in plan.roots)
    context = RunContext(
        run_id=plan.run_id,
        request=plan.request,
        reporter=reporter,
        files=FileStores(corpora, artifacts, runs),
        # A cache of each rank's own: two processes never fetch into the same file.
        cache=FileCache(plan.cache_root / f"rank-{rank}", plan.cache_max_bytes),
        log_lines=log_writer.write if rank == 0 else _discard,
        queue=plan.queue,
        worker=plan.worker,
        torch_threads=plan.torch_threads,
        progress_interval_s=plan.progress_interval_s,
        # The heartbeat runs in the task's process; a rank reads the cancel flag from the record.
        cancel_requested=lambda: store.cancel_requested(plan.run_id),
        lease_lost=lambda: False,
        settings=settings,
        checkpoint_interval_s=plan.checkpoint_interval_s,
        over_time_limit=lambda: time.monotonic() >= deadline,
        max_run_s=plan.max_run_s,
    )
    try:
        train(context)
    except Exception as exc:
        if rank == 0:
            reporter.failed_with(exc)
        else:
            # The launcher stops every rank at the first failure: rank zero, failing the same way on the
            # same data, gets the time to tell the user why before this one's failure stops it.
            time.sleep(RANK_ZERO_GRACE_S)
        raise
    finally:
        log_writer.close()
        client.close()


def _discard(line: str) -> None:
    """Ranks other than zero log to their process only: the run's log holds one copy of each line."""


def in_rank() -> bool:
    return RANK_ENV in os.environ
