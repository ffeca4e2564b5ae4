"""Idempotency-Key on the creating routes, through Flask's test client and a real Redis: replays, a key
reused with another body, failures that free the key, a second request while the first is in progress."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from flask_smorest import Blueprint
from werkzeug.test import TestResponse

from schemas.api import ErrorSchema
from tests.conftest import DispatchRecorder
from tests.test_api import SNOWFLAKE, assert_envelope, field_errors, json_of, submit, valid_body
from trainer_api import create_app, idempotency
from trainer_api.errors import TrainerApi
from trainer_api.idempotency import (
    HEADER,
    KEPT_S,
    PENDING_S,
    REPLAYED_HEADER,
    idempotent,
    record_key,
    request_fingerprint,
)
from trainer_api.services import EXTENSION, Task, build
from trainer_store.runs import RunStore, user_runs_key
from trainer_store.settings import Settings
from trainer_tasks.app import TOKENIZER_TASK

KEY = "order-7f3a"


def keyed(key: str = KEY) -> dict[str, str]:
    return {HEADER: key}


def runs_of(redis_client: redis.Redis, user_id: int = SNOWFLAKE) -> int:
    return int(redis_client.zcard(user_runs_key(user_id)))


def upload(client: FlaskClient, content: bytes, key: str = KEY, name: str = "book.txt") -> TestResponse:
    return client.post(
        "/corpora",
        data={"file": (io.BytesIO(content), name)},
        content_type="multipart/form-data",
        headers=keyed(key),
    )


# ----------------------------------------------------------------------------------------------- replay


def test_the_same_key_and_body_answer_the_first_response_again(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    first = submit(client, valid_body(), headers=keyed())
    assert first.status_code == 202, first.get_data(as_text=True)
    assert REPLAYED_HEADER not in first.headers
    # Key order and spacing are not part of the request's meaning.
    again = client.post(
        "/runs/train",
        data=f'{{"user_id": {SNOWFLAKE},   "corpus_path": "notes.txt"}}',
        content_type="application/json",
        headers=keyed(),
    )
    assert again.status_code == 202
    assert again.get_json() == first.get_json()
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert len(dispatched.sent) == 1
    assert runs_of(redis_client) == 1
    ttl = redis_client.ttl(record_key("POST /runs/train", KEY))
    assert KEPT_S - 10 < ttl <= KEPT_S


def test_without_the_header_every_request_creates(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    assert submit(client, valid_body()).status_code == 202
    assert submit(client, valid_body()).status_code == 202
    assert len(dispatched.sent) == 2


def test_keys_are_per_route_and_per_value(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    one = json_of(submit(client, valid_body(), headers=keyed("a")))
    two = json_of(submit(client, valid_body(), headers=keyed("b")))
    assert one["run_id"] != two["run_id"]
    # The same key on another route is another key.
    tokenizer = client.post("/tokenizers/train", json={"corpus_path": "notes.txt"}, headers=keyed("a"))
    assert tokenizer.status_code == 202, tokenizer.get_data(as_text=True)
    assert [name for name, _, _ in dispatched.calls].count(TOKENIZER_TASK) == 1
    assert record_key("POST /runs/train", "a") != record_key("POST /tokenizers/train", "a")
    expected = hashlib.sha256(b"POST /runs/train\na").hexdigest()
    assert record_key("POST /runs/train", "a") == f"trainer:idempotency:{expected}"
    assert redis_client.exists(record_key("POST /tokenizers/train", "a")) == 1


def test_a_tokenizer_request_is_replayed(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    body = {"corpus_path": "notes.txt", "vocab_size": 300}
    first = client.post("/tokenizers/train", json=body, headers=keyed())
    again = client.post("/tokenizers/train", json=body, headers=keyed())
    assert first.status_code == again.status_code == 202
    assert again.get_json() == first.get_json()
    assert len(dispatched.calls) == 1


def test_an_upload_is_replayed_by_its_content(client: FlaskClient, redis_client: redis.Redis) -> None:
    first = upload(client, b"the cat sat\n")
    assert first.status_code == 201, first.get_data(as_text=True)
    again = upload(client, b"the cat sat\n")
    assert again.status_code == 201
    assert again.get_json() == first.get_json()
    assert again.headers[REPLAYED_HEADER] == "true"
    assert redis_client.zcard("trainer:corpora") == 1
    # The same key with another file is another request.
    other = upload(client, b"the dog ran\n")
    assert field_errors(other) == {HEADER: ["was used with another request; use a new key for this one"]}
    renamed = upload(client, b"the cat sat\n", name="other.txt")
    assert renamed.status_code == 422
    assert redis_client.zcard("trainer:corpora") == 1


# ------------------------------------------------------------------------------------- another body


def test_the_same_key_with_another_body_is_422(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    assert submit(client, valid_body(), headers=keyed()).status_code == 202
    response = submit(client, valid_body(num_epochs=2), headers=keyed())
    errors = field_errors(response)
    assert errors == {HEADER: ["was used with another request; use a new key for this one"]}
    assert len(dispatched.sent) == 1
    assert runs_of(redis_client) == 1


@pytest.mark.parametrize(
    "value", ["", "x" * 256, "caf\u00e9", "tab\there"], ids=["empty", "too-long", "non-ascii", "control"]
)
def test_a_malformed_key_is_422(value: str, client: FlaskClient, dispatched: DispatchRecorder) -> None:
    environ = {f"HTTP_{HEADER.upper().replace('-', '_')}": value}
    response = client.post("/runs/train", json=valid_body(), environ_base=environ)
    assert field_errors(response) == {HEADER: ["must be 1 to 255 printable ASCII characters"]}
    assert not dispatched.sent


def test_the_longest_key_is_accepted(client: FlaskClient) -> None:
    assert submit(client, valid_body(), headers=keyed("k" * 255)).status_code == 202


# -------------------------------------------------------------------------------- failures free the key


def test_a_refused_first_request_frees_the_key(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    refused = submit(client, valid_body(num_epochs=0), headers=keyed())
    assert refused.status_code == 422
    assert redis_client.exists(record_key("POST /runs/train", KEY)) == 0
    fixed = submit(client, valid_body(), headers=keyed())
    assert fixed.status_code == 202, "the corrected request, with the same key, goes through"
    assert len(dispatched.sent) == 1


def test_a_first_request_that_crashed_frees_the_key(settings: Settings, redis_client: redis.Redis) -> None:
    attempts: list[str] = []

    def dispatch(task: Task) -> None:
        attempts.append(task.task_id)
        if len(attempts) == 1:
            raise redis.ConnectionError("broker away")

    client = create_app(settings, dispatch=dispatch).test_client()
    assert_envelope(submit(client, valid_body(), headers=keyed()), 503, "SERVICE_UNAVAILABLE")
    retried = submit(client, valid_body(), headers=keyed())
    assert retried.status_code == 202
    assert REPLAYED_HEADER not in retried.headers
    assert len(attempts) == 2
    statuses = sorted(record.status for record in RunStore(redis_client).list_for_user(SNOWFLAKE, 10))
    assert statuses == ["failed", "queued"]


def test_a_key_whose_request_died_is_taken_over_once_its_reservation_expires(
    app: Flask, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    """A request that died holding the key (its process killed) leaves a reservation that expires."""
    with app.test_request_context("/runs/train", method="POST", json=valid_body()):
        fingerprint = request_fingerprint()
    key = record_key("POST /runs/train", KEY)
    redis_client.hset(key, mapping={"fingerprint": fingerprint, "owner": "a-dead-request"})
    redis_client.pexpire(key, 300)
    response = submit(app.test_client(), valid_body(), headers=keyed())
    assert response.status_code == 202
    assert REPLAYED_HEADER not in response.headers
    assert len(dispatched.sent) == 1
    assert redis_client.pttl(key) > PENDING_S * 1000, "the answer is kept for its full time"


# ------------------------------------------------------------------------------ a request in progress


@pytest.fixture
def gated(
    settings: Settings, redis_client: redis.Redis
) -> Iterator[tuple[Flask, threading.Event, list[str]]]:
    """An app whose dispatch waits for the gate: its first request stays in progress until opened."""
    gate = threading.Event()
    sent: list[str] = []

    def dispatch(task: Task) -> None:
        assert gate.wait(10)
        sent.append(task.task_id)

    yield create_app(settings, dispatch=dispatch), gate, sent
    gate.set()


def start_first(app: Flask) -> tuple[threading.Thread, list[TestResponse]]:
    answers: list[TestResponse] = []
    thread = threading.Thread(
        target=lambda: answers.append(submit(app.test_client(), valid_body(), headers=keyed()))
    )
    thread.start()
    return thread, answers


def wait_for_reservation(redis_client: redis.Redis) -> None:
    for _ in range(200):
        if redis_client.exists(record_key("POST /runs/train", KEY)):
            return
        threading.Event().wait(0.02)
    raise AssertionError("the first request never reserved its key")


def test_a_second_request_waits_for_the_first_answer(
    gated: tuple[Flask, threading.Event, list[str]], redis_client: redis.Redis
) -> None:
    app, gate, sent = gated
    thread, answers = start_first(app)
    wait_for_reservation(redis_client)
    threading.Timer(0.3, gate.set).start()
    second = submit(app.test_client(), valid_body(), headers=keyed())
    thread.join(10)
    assert second.status_code == 202
    assert second.headers[REPLAYED_HEADER] == "true"
    assert second.get_json() == answers[0].get_json()
    assert len(sent) == 1


def test_a_second_request_that_waits_too_long_is_409(
    gated: tuple[Flask, threading.Event, list[str]],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(idempotency, "WAIT_S", 0.3)
    app, gate, sent = gated
    thread, answers = start_first(app)
    wait_for_reservation(redis_client)
    second = submit(app.test_client(), valid_body(), headers=keyed())
    body = assert_envelope(second, 409, "CONFLICT")
    assert body["message"] == f"a request with this {HEADER} is still being processed; retry shortly"
    assert second.headers["Retry-After"] == "1"
    gate.set()
    thread.join(10)
    assert answers[0].status_code == 202
    assert len(sent) == 1


def test_the_openapi_document_names_the_header(client: FlaskClient) -> None:
    spec = json_of(client.get("/openapi.json"))
    paths = spec["paths"]
    assert isinstance(paths, dict)
    for path in ("/runs/train", "/corpora", "/tokenizers/train"):
        operation = paths[path]["post"]
        assert [parameter["name"] for parameter in operation["parameters"]] == [HEADER]
        assert "409" in operation["responses"]
    assert "parameters" not in paths["/runs/{run_id}/cancel"]["post"]


def test_a_route_that_answers_an_error_without_raising_frees_the_key(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Any route may opt in: one that answers 409 as a value frees the key too, and keeps its own 409 doc."""
    app = Flask("own-route")
    app.config.update(API_TITLE="own", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    app.extensions[EXTENSION] = build(settings)
    api = TrainerApi(app)
    blp = Blueprint("things", __name__)
    answers: Iterator[tuple[dict[str, object], int]] = iter([({"code": "CONFLICT"}, 409), ({"made": 1}, 201)])

    def make() -> tuple[dict[str, object], int]:
        return next(answers)

    documented = blp.alt_response(409, schema=ErrorSchema, description="Made already.")(make)
    blp.route("/things", methods=["POST"])(idempotent(blp.response(201)(documented)))
    api.register_blueprint(blp)
    client = app.test_client()

    assert client.post("/things", json={}, headers=keyed()).status_code == 409
    assert redis_client.exists(record_key("POST /things", KEY)) == 0
    made = client.post("/things", json={}, headers=keyed())
    assert (made.status_code, made.get_json()) == (201, {"made": 1})
    again = client.post("/things", json={}, headers=keyed())
    assert (again.status_code, again.headers[REPLAYED_HEADER]) == (201, "true")
    paths = api.spec.to_dict()["paths"]
    assert paths["/things"]["post"]["responses"]["409"]["description"] == "Made already."
    assert paths["/things"]["post"]["parameters"][0]["name"] == HEADER
