"""Caps on runs and the range of user ids, through Flask's test client and a real Redis."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import pytest
import redis
from flask.testing import FlaskClient

from schemas.api import MAX_USER_ID
from tests.conftest import DispatchRecorder
from tests.test_api import SNOWFLAKE, app_with, assert_envelope, field_errors, json_of, submit, valid_body
from trainer_api import create_app, limits
from trainer_api.limits import RETRY_AFTER_S
from trainer_api.services import Task
from trainer_store.runs import NEVER_SENT_MESSAGE, RunStore
from trainer_store.settings import Settings

RANGE_MESSAGE = [f"must be a Discord user id from 0 to {MAX_USER_ID} (0: no Discord user)"]


def test_a_discord_user_beyond_the_cap_is_429_with_retry_after(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    for _ in range(3):
        assert submit(client, valid_body()).status_code == 202
    response = submit(client, valid_body())
    body = assert_envelope(response, 429, "TOO_MANY_REQUESTS")
    assert body["message"] == (
        f"user {SNOWFLAKE} already has 3 runs queued or running; at most 3 are allowed at once; "
        "submit again once one has finished"
    )
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert len(dispatched.sent) == 3
    # Another user is not held back, and a finished run frees a place.
    assert submit(client, valid_body(user_id=SNOWFLAKE + 1)).status_code == 202
    store = RunStore(redis_client)
    run_id = dispatched.sent[0][0]
    assert store.transition(run_id, ("queued",), "canceled", {"message": "canceled"})
    assert submit(client, valid_body()).status_code == 202


def test_user_zero_has_no_cap(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    for _ in range(5):
        assert submit(client, valid_body(user_id=0)).status_code == 202
    assert len(dispatched.sent) == 5


def test_the_cap_follows_the_setting(settings: Settings, redis_client: redis.Redis) -> None:
    app, dispatched = app_with(replace(settings, max_active_runs_per_user=1))
    client = app.test_client()
    assert submit(client, valid_body()).status_code == 202
    body = assert_envelope(submit(client, valid_body()), 429, "TOO_MANY_REQUESTS")
    assert "at most 1 are allowed" in str(body["message"])
    assert len(dispatched.sent) == 1


def test_a_full_queue_is_503_with_retry_after(settings: Settings, redis_client: redis.Redis) -> None:
    app, dispatched = app_with(replace(settings, max_queued_runs=2))
    client = app.test_client()
    for user_id in (1, 2):
        assert submit(client, valid_body(user_id=user_id)).status_code == 202
    response = submit(client, valid_body(user_id=0))
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "the queue is full (2 runs waiting, at most 2); try again in a few minutes"
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert len(dispatched.sent) == 2
    assert RunStore(redis_client).counts()["queued"] == 2


@pytest.mark.parametrize("user_id", [0, 1, MAX_USER_ID])
def test_user_ids_across_the_snowflake_range(
    user_id: int, client: FlaskClient, redis_client: redis.Redis
) -> None:
    response = submit(client, valid_body(user_id=user_id))
    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = json_of(response)["run_id"]
    assert isinstance(run_id, str)
    record = RunStore(redis_client).get(run_id)
    assert record is not None
    assert record.user_id == user_id, "a 64-bit id survives Redis and the scripts exactly"
    listed = json_of(client.get(f"/runs?user_id={user_id}"))["runs"]
    assert isinstance(listed, list)
    assert [run["run_id"] for run in listed] == [run_id]


@pytest.mark.parametrize("user_id", [MAX_USER_ID + 1, 2**64, -1])
def test_user_ids_outside_the_range_are_422_naming_it(
    user_id: int, client: FlaskClient, dispatched: DispatchRecorder
) -> None:
    assert field_errors(submit(client, valid_body(user_id=user_id))) == {"user_id": RANGE_MESSAGE}
    assert field_errors(client.get(f"/runs?user_id={user_id}")) == {"user_id": RANGE_MESSAGE}
    assert not dispatched.sent


def test_a_corpus_deleted_while_the_request_ran_is_422(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    """A DELETE that has begun (the corpus is marked) wins over a run submitted at the same moment."""
    upload = client.post(
        "/corpora", data={"file": (io.BytesIO(b"the cat sat\n"), "c.txt")}, content_type="multipart/form-data"
    )
    corpus_id = json_of(upload)["corpus_id"]
    assert isinstance(corpus_id, str)
    assert RunStore(redis_client).retire_corpus(corpus_id).outcome == "retired"
    response = submit(client, {"corpus_id": corpus_id, "user_id": SNOWFLAKE})
    assert field_errors(response) == {"corpus_id": ["the corpus was deleted; upload it again"]}
    assert not dispatched.sent
    assert RunStore(redis_client).counts()["queued"] == 0


def test_a_send_that_outlasted_the_grace_is_503(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request stuck sending its task longer than the grace: the run was failed as never sent meanwhile,
    so the caller is told it was not queued (its late task finds the run failed and does nothing)."""
    monkeypatch.setattr(limits, "UNSENT_GRACE_S", 0.1)
    store = RunStore(redis_client)

    def slow_send(task: Task) -> None:
        time.sleep(0.3)
        store.fail_unsent()  # what any other request does first

    client = create_app(settings, dispatch=slow_send).test_client()
    body = assert_envelope(submit(client, valid_body()), 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "queuing the run took too long; it was not queued, submit it again"
    [record] = store.list_for_user(SNOWFLAKE, 10)
    assert (record.status, record.message) == ("failed", NEVER_SENT_MESSAGE)


def test_a_run_claimed_before_its_send_was_confirmed_is_accepted(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A fast worker may claim the run before the API confirms the send: that is a sent task."""
    store = RunStore(redis_client)

    def send_to_a_fast_worker(task: Task) -> None:
        assert store.claim(task.args[0], "fast-worker", 60, time.time())

    client = create_app(settings, dispatch=send_to_a_fast_worker).test_client()
    response = submit(client, valid_body())
    assert response.status_code == 202, response.get_data(as_text=True)
    record = store.get(str(json_of(response)["run_id"]))
    assert record is not None
    assert record.status == "running"
