"""trainer_store.cleanup: a run's working files leave the store once its record expires; a deleted
run takes everything with it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.conftest import Stack
from trainer_store.cleanup import remove_run_files, sweep_expired_runs
from trainer_store.layout import FileStores
from trainer_store.runs import EXPIRING_RUNS, FINISHED_RUN_TTL_S, RunStore, run_key, run_log_key
from trainer_store.storage import Storage


@pytest.fixture(params=["local", "s3"])
def files(request: pytest.FixtureRequest, tmp_path: Path) -> FileStores:
    if request.param == "local":
        roots = [str(tmp_path / name) for name in ("corpora", "artifacts", "runs")]
    else:
        bucket: str = request.getfixturevalue("s3_bucket")
        roots = [f"{bucket}/{name}" for name in ("corpora", "artifacts", "runs")]
    return FileStores(*(Storage(root) for root in roots))


def finished_run(store: RunStore, files: FileStores, client: redis.Redis, run_id: str) -> None:
    """A run that trained and finished: checkpoints, a split, a model folder, log lines."""
    store.create(run_id=run_id, job_id="job", user_id=7, request={}, now=1.0)
    assert store.claim(run_id, "worker", 60, 2.0)
    files.runs.write_bytes(f"{run_id}/checkpoints/last.ckpt", b"checkpoint")
    files.runs.write_bytes(f"{run_id}/splits/validation.pt", b"split")
    files.artifacts.write_bytes(f"models/{run_id}/manifest.json", b"{}")
    client.xadd(run_log_key(run_id), {"line": "{}"})
    assert store.finish(run_id, "completed", "completed", 3.0)


def expire(client: redis.Redis, run_id: str) -> None:
    """Let Redis expire the record now rather than in 30 days."""
    client.pexpire(run_key(run_id), 1)
    deadline = time.monotonic() + 5
    while client.exists(run_key(run_id)) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_finished_run_is_indexed_by_when_its_record_expires(redis_client: redis.Redis) -> None:
    store = RunStore(redis_client)
    store.create(run_id="r1", job_id="job", user_id=7, request={}, now=1.0)
    assert redis_client.zscore(EXPIRING_RUNS, "r1") is None  # active runs never expire
    assert store.claim("r1", "worker", 60, 2.0)
    before = time.time()
    assert store.finish("r1", "failed", "boom", 3.0)
    score = redis_client.zscore(EXPIRING_RUNS, "r1")
    assert score is not None
    assert before + FINISHED_RUN_TTL_S <= score <= time.time() + FINISHED_RUN_TTL_S


def test_the_sweep_removes_working_files_of_expired_runs_only(
    files: FileStores, redis_client: redis.Redis
) -> None:
    store = RunStore(redis_client)
    for run_id in ("expired", "extended", "revived", "later"):
        finished_run(store, files, redis_client, run_id)
    expire(redis_client, "expired")
    redis_client.persist(run_key("revived"))  # active again: its record no longer expires
    redis_client.zadd(EXPIRING_RUNS, {"later": time.time() + 10 * FINISHED_RUN_TTL_S})
    now = time.time() + FINISHED_RUN_TTL_S + 1  # every other run's record would have expired by now

    assert sweep_expired_runs(files, redis_client, now) == ["expired"]
    assert not files.runs.exists("expired/checkpoints/last.ckpt")
    assert not files.runs.exists("expired/splits/validation.pt")
    assert not redis_client.exists(run_log_key("expired"))
    assert files.artifacts.exists("models/expired/manifest.json"), "artifacts stay until deleted"
    # A record still there is looked at again when it would expire; the others keep their files.
    extended = redis_client.zscore(EXPIRING_RUNS, "extended")
    assert extended is not None
    assert now < extended <= now + FINISHED_RUN_TTL_S
    assert redis_client.zscore(EXPIRING_RUNS, "revived") is None
    assert redis_client.zscore(EXPIRING_RUNS, "expired") is None
    for run_id in ("extended", "revived", "later"):
        assert files.runs.exists(f"{run_id}/checkpoints/last.ckpt")
    assert sweep_expired_runs(files, redis_client, now) == []


def test_the_sweep_takes_a_batch_at_a_time(files: FileStores, redis_client: redis.Redis) -> None:
    redis_client.zadd(EXPIRING_RUNS, {f"gone-{n}": n for n in range(5)})
    assert len(sweep_expired_runs(files, redis_client, time.time(), batch=3)) == 3
    assert redis_client.zcard(EXPIRING_RUNS) == 2


def test_removing_a_run_takes_its_artifacts_too(files: FileStores, redis_client: redis.Redis) -> None:
    store = RunStore(redis_client)
    finished_run(store, files, redis_client, "deleted")
    finished_run(store, files, redis_client, "kept")
    remove_run_files(files, redis_client, "deleted")
    assert not files.runs.exists("deleted/checkpoints/last.ckpt")
    assert not files.artifacts.exists("models/deleted/manifest.json")
    assert not redis_client.exists(run_log_key("deleted"))
    assert redis_client.zscore(EXPIRING_RUNS, "deleted") is None
    assert files.artifacts.exists("models/kept/manifest.json")
    assert files.runs.exists("kept/splits/validation.pt")
    remove_run_files(files, redis_client, "deleted")  # again: nothing left, no error


def test_a_running_worker_sweeps_expired_runs_on_its_own(stack: Stack) -> None:
    """The workers' main processes run the sweep (every 0.5 s in the test stack)."""
    client = redis.Redis.from_url(stack.redis_url)
    runs = Path(stack.env["APP__RUNS_ROOT"])
    (runs / "long-gone" / "checkpoints").mkdir(parents=True)
    (runs / "long-gone" / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    client.zadd(EXPIRING_RUNS, {"long-gone": time.time() - 1})  # its record expired a second ago
    deadline = time.monotonic() + 60
    # The sweep removes the files, then the run's entry in the index: wait for both.
    while (
        (runs / "long-gone").exists() or client.zscore(EXPIRING_RUNS, "long-gone") is not None
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (runs / "long-gone").exists()
    assert client.zscore(EXPIRING_RUNS, "long-gone") is None
