"""The evaluate task tells the run's owner how it ended: eval events on the stream, after the run's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from schemas.events import EvalCompleted, EvalFailed
from scripts import demo
from tests.streams import sent_events
from tests.test_evaluation import blocks, save_model, save_split
from trainer_store.jobs import JobStore, evaluation_key
from trainer_store.runs import RunStore, run_key
from trainer_tasks import tasks
from trainer_tasks.jobs import JobEnd

USER = 123456789012345678


def owned_run(redis_client: redis.Redis, run_id: str, split: str, last_seq: int = 7) -> None:
    RunStore(redis_client).create(run_id=run_id, job_id="j", user_id=USER, request={}, now=1.0)
    redis_client.hset(run_key(run_id), mapping={"status": "completed", "last_seq": last_seq})
    JobStore(redis_client).create(evaluation_key(run_id), {"split": split}, now=2.0)


def test_a_completed_evaluation_is_an_event_numbered_after_the_runs_own(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    save_model(worker_env / "env-artifacts" / "models" / "run-e1")
    save_split(worker_env / "env-runs" / "run-e1" / "splits", "test", blocks(seed=3))
    owned_run(redis_client, "run-e1", "test")
    assert tasks.evaluate.run("run-e1", "test") == "completed"
    [event] = sent_events(redis_client)
    assert isinstance(event, EvalCompleted)
    record = JobStore(redis_client).get(evaluation_key("run-e1"))
    assert record is not None
    assert record.result is not None
    assert (event.run_id, event.request_id, event.user_id, event.split) == ("run-e1", "run-e1", USER, "test")
    assert (event.loss, event.seq) == (record.result["loss"], 8)
    assert event.event_id
    assert event.ts is not None
    assert demo.describe(event).startswith("evaluated  test loss ")


@pytest.mark.parametrize(
    ("split_content", "kind", "message"),
    [
        (None, "user", "the run has no validation split to evaluate"),
        ("not blocks", "system", "the worker hit an internal error (TypeError); see the worker log"),
    ],
)
def test_a_failed_evaluation_says_whose_it_is_to_fix(
    worker_env: Path, redis_client: redis.Redis, split_content: str | None, kind: str, message: str
) -> None:
    save_model(worker_env / "env-artifacts" / "models" / "run-e2")
    if split_content is not None:
        save_split(worker_env / "env-runs" / "run-e2" / "splits", "validation", split_content)
    owned_run(redis_client, "run-e2", "validation", last_seq=0)
    assert tasks.evaluate.run("run-e2", "validation") == "failed"
    [event] = sent_events(redis_client)
    assert isinstance(event, EvalFailed)
    assert (event.split, event.error_kind, event.message, event.seq) == ("validation", kind, message, 1)
    assert demo.describe(event) == f"evaluation of the validation split failed ({kind}) {message}"


def test_an_evaluation_of_a_run_that_expired_tells_nobody(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    JobStore(redis_client).create(evaluation_key("run-gone"), {"split": "validation"}, now=2.0)
    assert tasks.evaluate.run("run-gone", "validation") == "failed"
    assert sent_events(redis_client) == []


def test_an_evaluation_result_without_its_numbers_is_refused_not_published(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    owned_run(redis_client, "run-e3", "test")
    end = JobEnd({"split": "test"}, result={"split": "test", "loss": 2.5, "perplexity": "inf"})
    with pytest.raises(TypeError, match="the evaluation's perplexity is not a number"):
        tasks.tell_evaluated("run-e3", end)
    assert sent_events(redis_client) == [], "no event with a made-up number"
