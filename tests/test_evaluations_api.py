"""Evaluation requests and results through Flask's test client; the worker's records are written by hand."""

from __future__ import annotations

import logging

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from schemas.status import RunStatus
from tests.conftest import DispatchRecorder
from tests.test_api import assert_envelope, field_errors, json_of, submit, valid_body
from trainer_api import create_app
from trainer_api.services import Task
from trainer_store.jobs import JobStore, evaluation_key
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_tasks.app import EVALUATE_TASK

NO_TEST_SPLIT = {"split": ["the run was trained without a test split (test_fraction 0)"]}


def run_in(
    client: FlaskClient, redis_client: redis.Redis, status: RunStatus, test_fraction: float = 0.0
) -> str:
    """A run submitted through the API, then moved by hand the way the worker moves it."""
    run_id = json_of(submit(client, valid_body(test_fraction=test_fraction)))["run_id"]
    assert isinstance(run_id, str)
    store = RunStore(redis_client)
    if status != "queued":
        assert store.claim(run_id, "worker-a", lease_s=30, now=1700000000.0)
    if status in ("completed", "failed"):
        assert store.finish(run_id, status, status, 1700000050.0, loss=2.0, perplexity=7.39)
    return run_id


def evaluate(client: FlaskClient, run_id: str, split: str | None = None) -> TestResponse:
    if split is None:
        return client.post(f"/runs/{run_id}/evaluate")
    return client.post(f"/runs/{run_id}/evaluate", json={"split": split})


def evaluation_calls(dispatched: DispatchRecorder) -> list[tuple[str, list[str], str]]:
    return [call for call in dispatched.calls if call[0] == EVALUATE_TASK]


@pytest.fixture
def completed(client: FlaskClient, redis_client: redis.Redis) -> str:
    return run_in(client, redis_client, "completed")


@pytest.fixture
def completed_with_test(client: FlaskClient, redis_client: redis.Redis) -> str:
    return run_in(client, redis_client, "completed", test_fraction=0.2)


# ------------------------------------------------------------------------------------------ request


def test_evaluate_defaults_to_validation(
    client: FlaskClient, completed: str, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    response = evaluate(client, completed)
    assert response.status_code == 202
    body = json_of(response)
    job_id = body["job_id"]
    assert isinstance(job_id, str)
    assert body == {"run_id": completed, "split": "validation", "job_id": job_id}
    assert evaluation_calls(dispatched) == [(EVALUATE_TASK, [completed, "validation"], job_id)]
    record = JobStore(redis_client).get(evaluation_key(completed))
    assert record is not None
    assert (record.status, record.request) == ("queued", {"split": "validation"})


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluate_on_either_split_of_a_run_with_a_test_split(
    client: FlaskClient,
    completed_with_test: str,
    dispatched: DispatchRecorder,
    redis_client: redis.Redis,
    split: str,
) -> None:
    response = evaluate(client, completed_with_test, split)
    assert response.status_code == 202
    job_id = json_of(response)["job_id"]
    assert evaluation_calls(dispatched) == [(EVALUATE_TASK, [completed_with_test, split], job_id)]
    record = JobStore(redis_client).get(evaluation_key(completed_with_test))
    assert record is not None
    assert record.request == {"split": split}


def test_test_split_without_one_is_422(
    client: FlaskClient, completed: str, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    assert field_errors(evaluate(client, completed, "test")) == NO_TEST_SPLIT
    assert not evaluation_calls(dispatched)
    assert JobStore(redis_client).get(evaluation_key(completed)) is None


def test_test_split_on_a_request_without_the_field_is_422(
    client: FlaskClient, completed: str, redis_client: redis.Redis
) -> None:
    # Runs recorded before test_fraction existed have no such field: no test split.
    redis_client.hset(f"trainer:runs:{completed}", "request", '{"corpus_path": "/c/notes.txt"}')
    assert field_errors(evaluate(client, completed, "test")) == NO_TEST_SPLIT


@pytest.mark.parametrize(
    ("body", "field"), [({"split": "train"}, "split"), ({"split": 1}, "split"), ({"batches": 3}, "batches")]
)
def test_invalid_bodies_are_422(
    client: FlaskClient, completed: str, dispatched: DispatchRecorder, body: dict[str, object], field: str
) -> None:
    response = client.post(f"/runs/{completed}/evaluate", json=body)
    assert set(field_errors(response)) == {field}
    assert not evaluation_calls(dispatched)


@pytest.mark.parametrize("status", ["queued", "running", "failed"])
def test_a_run_that_has_not_completed_is_409(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder, status: RunStatus
) -> None:
    run_id = run_in(client, redis_client, status)
    body = assert_envelope(evaluate(client, run_id), 409, "CONFLICT")
    assert body["message"] == f"run {run_id!r} is {status}; only a completed run can be evaluated"
    assert not evaluation_calls(dispatched)


def test_an_unknown_run_is_404(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    body = assert_envelope(evaluate(client, "nope"), 404, "NOT_FOUND")
    assert body["message"] == "no run 'nope'"
    assert not dispatched.calls


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_second_evaluation_while_one_is_under_way_is_409(
    client: FlaskClient, completed: str, redis_client: redis.Redis, dispatched: DispatchRecorder, state: str
) -> None:
    assert evaluate(client, completed).status_code == 202
    if state == "running":
        JobStore(redis_client).start(evaluation_key(completed))
    body = assert_envelope(evaluate(client, completed), 409, "CONFLICT")
    assert body["message"] == f"an evaluation of run {completed!r} is already {state}"
    assert len(evaluation_calls(dispatched)) == 1


def test_a_new_evaluation_replaces_a_finished_one(
    client: FlaskClient, completed_with_test: str, redis_client: redis.Redis
) -> None:
    jobs = JobStore(redis_client)
    key = evaluation_key(completed_with_test)
    assert evaluate(client, completed_with_test, "validation").status_code == 202
    jobs.complete(key, {"split": "validation", "loss": 2.0, "perplexity": 7.39, "batches": 4}, 1700000100.0)
    assert evaluate(client, completed_with_test, "test").status_code == 202
    body = json_of(client.get(f"/runs/{completed_with_test}/eval"))
    assert (body["split"], body["status"], body["loss"], body["finished_at"]) == (
        "test",
        "queued",
        None,
        None,
    )


def test_a_dispatch_that_fails_marks_the_evaluation_failed(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    def dispatch(task: Task) -> None:
        if task.name == EVALUATE_TASK:
            raise redis.ConnectionError("broker down")

    client = create_app(settings, dispatch=dispatch).test_client()
    run_id = run_in(client, redis_client, "completed")
    with caplog.at_level(logging.WARNING, logger="trainer_api.errors"):
        assert_envelope(evaluate(client, run_id), 503, "SERVICE_UNAVAILABLE")
    body = json_of(client.get(f"/runs/{run_id}/eval"))
    assert body["status"] == "failed"
    assert body["message"] == "could not queue the job; nothing was done"
    # A failed evaluation does not block the next one.
    assert_envelope(evaluate(client, run_id), 503, "SERVICE_UNAVAILABLE")


# ------------------------------------------------------------------------------------------- result


def test_eval_before_any_evaluation_is_404(client: FlaskClient, completed: str) -> None:
    body = assert_envelope(client.get(f"/runs/{completed}/eval"), 404, "NOT_FOUND")
    assert body["message"] == f"run {completed!r} has not been evaluated; POST /runs/{completed}/evaluate"


def test_eval_of_an_unknown_run_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.get("/runs/nope/eval"), 404, "NOT_FOUND")
    assert body["message"] == "no run 'nope'"


def test_eval_of_a_queued_evaluation(client: FlaskClient, completed: str) -> None:
    assert evaluate(client, completed).status_code == 202
    body = json_of(client.get(f"/runs/{completed}/eval"))
    assert isinstance(body["created_at"], float)
    assert body == {
        "run_id": completed,
        "split": "validation",
        "status": "queued",
        "message": "queued",
        "loss": None,
        "perplexity": None,
        "created_at": body["created_at"],
        "finished_at": None,
    }


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_of_a_completed_evaluation_answers_loss_and_perplexity(
    client: FlaskClient, completed_with_test: str, redis_client: redis.Redis, split: str
) -> None:
    assert evaluate(client, completed_with_test, split).status_code == 202
    key = evaluation_key(completed_with_test)
    JobStore(redis_client).start(key)
    running = json_of(client.get(f"/runs/{completed_with_test}/eval"))
    assert (running["status"], running["loss"]) == ("running", None)
    result: dict[str, object] = {"split": split, "loss": 1.5, "perplexity": 4.4817, "batches": 3}
    JobStore(redis_client).complete(key, result, 1700000200.0)
    body = json_of(client.get(f"/runs/{completed_with_test}/eval"))
    assert body["split"] == split
    assert body["status"] == "completed"
    assert body["message"] == "completed"
    assert body["loss"] == 1.5
    assert body["perplexity"] == 4.4817
    assert body["finished_at"] == 1700000200.0


def test_eval_of_a_failed_evaluation_says_why(
    client: FlaskClient, completed: str, redis_client: redis.Redis
) -> None:
    assert evaluate(client, completed).status_code == 202
    JobStore(redis_client).fail(evaluation_key(completed), "the model folder is missing", 1700000300.0)
    body = json_of(client.get(f"/runs/{completed}/eval"))
    assert (body["status"], body["message"], body["loss"], body["perplexity"]) == (
        "failed",
        "the model folder is missing",
        None,
        None,
    )
    assert body["finished_at"] == 1700000300.0


def test_openapi_documents_the_evaluation_routes(client: FlaskClient) -> None:
    paths = json_of(client.get("/openapi.json"))["paths"]
    assert isinstance(paths, dict)
    assert {"202", "404", "409", "422"} <= set(paths["/runs/{run_id}/evaluate"]["post"]["responses"])
    assert {"200", "404"} <= set(paths["/runs/{run_id}/eval"]["get"]["responses"])
