"""GET /runs?user_id= and POST /runs/{run_id}/cancel through Flask's test client and a real Redis."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from scripts.devstack import free_port
from tests.conftest import DispatchRecorder, celery_on
from tests.test_api import assert_envelope, field_errors, json_of, submit, valid_body
from trainer_api import create_app
from trainer_api.services import Task, sender, services
from trainer_store.runs import RunStore, run_key, user_runs_key
from trainer_store.settings import Settings
from trainer_tasks.app import CANCEL_QUEUED_TASK, TRAIN_TASK

SNOWFLAKE = 123456789012345678
OTHER_USER = 876543210987654321


def submit_run(client: FlaskClient, user_id: int = SNOWFLAKE) -> str:
    response = submit(client, valid_body(user_id=user_id))
    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = json_of(response)["run_id"]
    assert isinstance(run_id, str)
    return run_id


def listed_ids(client: FlaskClient, query: str) -> list[object]:
    response = client.get(f"/runs?{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    runs = json_of(response)["runs"]
    assert isinstance(runs, list)
    return [run["run_id"] for run in runs if isinstance(run, dict)]


def test_a_users_runs_are_listed_newest_first_and_only_theirs(client: FlaskClient) -> None:
    mine = [submit_run(client) for _ in range(3)]
    submit_run(client, user_id=OTHER_USER)

    assert listed_ids(client, f"user_id={SNOWFLAKE}") == list(reversed(mine))
    assert listed_ids(client, f"user_id={SNOWFLAKE}&limit=2") == [mine[2], mine[1]]
    assert listed_ids(client, "user_id=5") == []
    run = json_of(client.get(f"/runs?user_id={OTHER_USER}"))["runs"]
    assert isinstance(run, list)
    assert run[0]["user_id"] == OTHER_USER
    assert run[0]["status"] == "queued"
    assert "request" not in run[0]


def test_a_run_whose_record_expired_leaves_the_list_and_the_index(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    kept, expired = submit_run(client), submit_run(client)
    redis_client.delete(run_key(expired))

    assert listed_ids(client, f"user_id={SNOWFLAKE}") == [kept]
    assert redis_client.zrange(user_runs_key(SNOWFLAKE), 0, -1) == [kept.encode()]


def test_the_default_limit_is_20(client: FlaskClient) -> None:
    for _ in range(21):
        submit_run(client, user_id=0)  # no Discord user, so no cap on active runs
    assert len(listed_ids(client, "user_id=0")) == 20


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "user_id"),
        ("user_id=abc", "user_id"),
        ("user_id=-1", "user_id"),
        (f"user_id={SNOWFLAKE}&limit=0", "limit"),
        (f"user_id={SNOWFLAKE}&limit=101", "limit"),
        (f"user_id={SNOWFLAKE}&limit=ten", "limit"),
        (f"user_id={SNOWFLAKE}&colour=blue", "colour"),
    ],
)
def test_bad_list_queries_are_422_in_the_envelope(client: FlaskClient, query: str, field: str) -> None:
    assert field in field_errors(client.get(f"/runs?{query}"))


def test_cancel_flags_a_queued_run_and_asks_the_light_queue_to_end_it(
    client: FlaskClient, app: Flask, dispatched: DispatchRecorder
) -> None:
    run_id = submit_run(client)
    response = client.post(f"/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert json_of(response) == {"status": "cancellation-requested"}
    with app.app_context():
        assert services().store.cancel_requested(run_id)
    ended = [task for task in dispatched.tasks if task.name == CANCEL_QUEUED_TASK]
    assert [(task.args, task.queue) for task in ended] == [([run_id], None)], "routed by celeryconfig"
    # Asking twice before the worker acts is harmless.
    assert client.post(f"/runs/{run_id}/cancel").status_code == 202


def test_a_cancel_the_broker_cannot_take_still_stands(
    settings: Settings, dispatched: DispatchRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The light queue's broker is away (a closed port): the run is flagged, which is what cancels it."""
    send_away = sender(celery_on(f"redis://127.0.0.1:{free_port()}/0"))

    def dispatch(task: Task) -> None:
        (send_away if task.name == CANCEL_QUEUED_TASK else dispatched)(task)

    app = create_app(settings, dispatch)
    client = app.test_client()
    run_id = submit_run(client)
    with caplog.at_level(logging.WARNING, logger="trainer_api.runs"):
        response = client.post(f"/runs/{run_id}/cancel")
    assert response.status_code == 202, response.get_data(as_text=True)
    assert json_of(response) == {"status": "cancellation-requested"}
    with app.app_context():
        record = services().store.get(run_id)
        assert record is not None
        assert (record.status, record.cancel_requested) == ("queued", True)
    assert f"run {run_id}: cancel recorded; the light queue could not be told" in caplog.text


def test_cancel_of_a_running_run_only_flags_it(
    client: FlaskClient, app: Flask, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    run_id = submit_run(client)
    assert RunStore(redis_client).claim(run_id, "host:1", 30.0, time.time(), "training@a")
    assert client.post(f"/runs/{run_id}/cancel").status_code == 202
    assert RunStore(redis_client).cancel_requested(run_id)
    assert [task.name for task in dispatched.tasks] == [TRAIN_TASK]


def test_cancel_of_an_unknown_run_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.post("/runs/nope/cancel"), 404, "NOT_FOUND")
    assert "nope" in str(body["message"])


@pytest.mark.parametrize("status", ["completed", "failed", "canceled"])
def test_cancel_of_a_finished_run_is_409(client: FlaskClient, redis_client: redis.Redis, status: str) -> None:
    run_id = submit_run(client)
    redis_client.hset(run_key(run_id), "status", status)

    body = assert_envelope(client.post(f"/runs/{run_id}/cancel"), 409, "CONFLICT")
    assert status in str(body["message"])
    assert not RunStore(redis_client).cancel_requested(run_id)
