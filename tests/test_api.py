"""The v1 HTTP contract through Flask's test client: submit, status, validation, errors, headers, keys."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from flask_smorest import abort
from kombu.exceptions import OperationalError
from werkzeug.test import TestResponse

from schemas.api import TrainRequest
from schemas.models import (
    DEFAULT_FAMILY,
    DEFAULT_SIZE,
    MODEL_FAMILIES,
    ModelShape,
    model_shape,
    reference_params,
)
from schemas.queues import NEW_TASK_PRIORITY
from scripts.devstack import free_port
from tests.conftest import DispatchRecorder
from trainer_api import create_app
from trainer_api.services import EXTENSION, Batching, Task, services
from trainer_store.runs import RunStore, user_runs_key
from trainer_store.settings import Settings
from trainer_store.storage import Storage
from trainer_tasks.app import TRAIN_TASK, celery_app

SNOWFLAKE = 123456789012345678
ENVELOPE_KEYS = {"code", "message", "request_id"}


# ---------------------------------------------------------------------------------------------- helpers


def json_of(response: TestResponse) -> dict[str, object]:
    data = response.get_json(silent=True)
    assert isinstance(data, dict), response.get_data(as_text=True)
    return {str(key): value for key, value in data.items()}


def submit(
    client: FlaskClient, body: dict[str, object], headers: dict[str, str] | None = None
) -> TestResponse:
    return client.post("/runs/train", json=body, headers=headers or {})


def valid_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"corpus_path": "notes.txt", "user_id": SNOWFLAKE}
    body.update(overrides)
    return body


def assert_envelope(response: TestResponse, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = json_of(response)
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert set(body) - {"errors"} == ENVELOPE_KEYS
    return body


def field_errors(response: TestResponse) -> dict[str, object]:
    body = assert_envelope(response, 422, "VALIDATION_ERROR")
    errors = body["errors"]
    assert isinstance(errors, dict)
    fields = {str(name): messages for name, messages in errors.items()}
    assert body["message"] == "invalid field(s): " + ", ".join(sorted(fields))
    for messages in fields.values():
        assert isinstance(messages, list)
        assert messages
        assert all(isinstance(message, str) for message in messages)
    return fields


def no_run_recorded(redis_client: redis.Redis, dispatched: DispatchRecorder) -> bool:
    return not redis_client.keys("trainer:runs:*") and not dispatched.sent


def stored_request(redis_client: redis.Redis, run_id: object) -> dict[str, object]:
    assert isinstance(run_id, str)
    record = RunStore(redis_client).get(run_id)
    assert record is not None
    return record.request


def app_with(settings: Settings) -> tuple[Flask, DispatchRecorder]:
    dispatched = DispatchRecorder()
    return create_app(settings, dispatch=dispatched), dispatched


def only_run_id(redis_client: redis.Redis, user_id: int = SNOWFLAKE) -> str:
    run_ids = redis_client.zrange(user_runs_key(user_id), 0, -1)
    assert len(run_ids) == 1
    run_id = run_ids[0]
    assert isinstance(run_id, bytes)
    return run_id.decode()


# ------------------------------------------------------------------------------------------- submit


def test_submit_answers_202_and_records_a_queued_run(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    response = submit(client, valid_body())
    assert response.status_code == 202
    accepted = json_of(response)
    assert set(accepted) == {"run_id", "job_id"}
    run_id, job_id = accepted["run_id"], accepted["job_id"]
    assert isinstance(run_id, str)
    assert isinstance(job_id, str)
    assert run_id
    assert job_id
    assert run_id != job_id
    assert dispatched.sent == [(run_id, job_id)]

    status = client.get(f"/runs/{run_id}")
    assert status.status_code == 200
    body = json_of(status)
    assert body["run_id"] == run_id
    assert body["job_id"] == job_id
    assert body["status"] == "queued"
    assert body["last_heartbeat_ts"] is None
    assert body["user_id"] == SNOWFLAKE
    assert isinstance(body["created_at"], float)
    assert body["message"] == "queued"
    assert body["attempt"] == 0
    assert "request" not in body
    assert "cancel_requested" not in body
    assert "last_seq" not in body
    assert redis_client.zrange(user_runs_key(SNOWFLAKE), 0, -1) == [run_id.encode()]


def test_snowflake_user_id_is_exact_in_the_status_text(client: FlaskClient) -> None:
    run_id = json_of(submit(client, valid_body()))["run_id"]
    assert b'"user_id":123456789012345678' in client.get(f"/runs/{run_id}").get_data()


def test_each_submit_gets_new_ids(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    first = json_of(submit(client, valid_body()))
    second = json_of(submit(client, valid_body()))
    assert first["run_id"] != second["run_id"]
    assert first["job_id"] != second["job_id"]
    assert len(dispatched.sent) == 2


def test_defaults_are_applied(client: FlaskClient, redis_client: redis.Redis, corpus_root: Path) -> None:
    run_id = json_of(submit(client, valid_body(user_id=0)))["run_id"]
    assert stored_request(redis_client, run_id) == {
        "model_family": "gpt2",
        "model_size": "small",
        "max_seq_len": 128,
        "num_epochs": 1,
        "batch_size": 16,
        "learning_rate": 0.001,
        "corpus_path": "notes.txt",  # a key under the corpus root, which every process understands
        "tokenizer_id": "auto",
        "user_id": 0,
        "seed": 1337,
        "holdout_fraction": 0.1,
        "test_fraction": 0.0,
        "corpus_id": None,
        "queue": "training",
        "accelerator": "auto",
        "devices": 1,
    }


def test_explicit_values_are_stored(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    body = valid_body(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=8,
        num_epochs=3,
        batch_size=1,
        learning_rate=5e-4,
        tokenizer_id="auto",
        seed=7,
        queue="gpu",
        accelerator="cpu",
        devices=2,
    )
    run_id = json_of(submit(client, body))["run_id"]
    stored = stored_request(redis_client, run_id)
    assert stored == {
        **body,
        "corpus_path": "notes.txt",
        "holdout_fraction": 0.1,
        "test_fraction": 0.0,
        "corpus_id": None,
    }


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("notes.txt", "notes.txt"),
        ("./notes.txt", "notes.txt"),
        ("books/../notes.txt", "notes.txt"),
        ("books/moby.txt", "books/moby.txt"),
    ],
)
def test_relative_corpus_paths_inside_the_root_are_stored_as_keys(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path, relative: str, key: str
) -> None:
    (corpus_root / "books").mkdir()
    (corpus_root / "books" / "moby.txt").write_text("call me ishmael\n")
    response = submit(client, valid_body(corpus_path=relative))
    assert response.status_code == 202
    assert stored_request(redis_client, json_of(response)["run_id"])["corpus_path"] == key


def test_an_absolute_corpus_path_inside_a_local_root_is_still_accepted(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    absolute = corpus_root.resolve() / "notes.txt"
    response = submit(client, valid_body(corpus_path=str(absolute)))
    assert response.status_code == 202
    assert stored_request(redis_client, json_of(response)["run_id"])["corpus_path"] == "notes.txt"


def test_symlink_inside_the_root_to_a_file_inside_is_stored_as_its_target(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    (corpus_root / "alias.txt").symlink_to(corpus_root / "notes.txt")
    response = submit(client, valid_body(corpus_path="alias.txt"))
    assert response.status_code == 202
    assert stored_request(redis_client, json_of(response)["run_id"])["corpus_path"] == "notes.txt"


def test_a_corpus_in_an_object_store_root(
    settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder, s3_bucket: str
) -> None:
    Storage(f"{s3_bucket}/corpora").write_bytes("books/moby.txt", b"call me ishmael\n")
    app, _ = app_with(replace(settings, corpus_root=f"{s3_bucket}/corpora"))
    client = app.test_client()
    for value in ("books/moby.txt", f"{s3_bucket}/corpora/books/moby.txt"):
        response = submit(client, valid_body(corpus_path=value))
        assert response.status_code == 202
        assert stored_request(redis_client, json_of(response)["run_id"])["corpus_path"] == "books/moby.txt"
    for value in ("../corpora/books/moby.txt", "/books/moby.txt", "books", "books/missing.txt"):
        fields = field_errors(submit(client, valid_body(corpus_path=value)))
        assert fields == {"corpus_path": ["must name an existing file inside the corpus root"]}


# ----------------------------------------------------------------------------------------- rejection


@pytest.fixture
def outside_file(tmp_path: Path) -> Path:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    return outside


@pytest.mark.parametrize(
    "case", ["dotdot", "absolute_elsewhere", "symlink_out", "directory", "missing", "root"]
)
def test_corpus_paths_that_are_rejected(
    client: FlaskClient,
    dispatched: DispatchRecorder,
    redis_client: redis.Redis,
    corpus_root: Path,
    outside_file: Path,
    case: str,
) -> None:
    (corpus_root / "sub").mkdir()
    (corpus_root / "escape.txt").symlink_to(outside_file)
    value = {
        "dotdot": "../outside.txt",
        "absolute_elsewhere": str(outside_file),
        "symlink_out": "escape.txt",
        "directory": "sub",
        "missing": "missing.txt",
        "root": str(corpus_root),
    }[case]
    fields = field_errors(submit(client, valid_body(corpus_path=value)))
    assert fields == {"corpus_path": ["must name an existing file inside the corpus root"]}
    assert no_run_recorded(redis_client, dispatched)


@pytest.mark.parametrize("value", ["notes\x00.txt", "x" * 5000, "a/" + "b" * 300 + "/c.txt"])
def test_corpus_paths_the_filesystem_cannot_hold_are_422(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis, value: str
) -> None:
    fields = field_errors(submit(client, valid_body(corpus_path=value)))
    assert fields == {"corpus_path": ["must name an existing file inside the corpus root"]}
    assert no_run_recorded(redis_client, dispatched)


def test_empty_corpus_path_is_rejected(client: FlaskClient) -> None:
    assert set(field_errors(submit(client, valid_body(corpus_path="")))) == {"corpus_path"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"unknown_field": 1}, "unknown_field"),
        ({"user_id": -1}, "user_id"),
        ({"user_id": "123"}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"user_id": 1.5}, "user_id"),
        ({"user_id": None}, "user_id"),
        ({"max_seq_len": 7}, "max_seq_len"),
        ({"max_seq_len": "128"}, "max_seq_len"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"model_family": "mamba"}, "model_family"),
        ({"model_family": 5}, "model_family"),
        ({"model_size": "huge"}, "model_size"),
        ({"tokenizer_id": "gpt2"}, "tokenizer_id"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: FlaskClient,
    dispatched: DispatchRecorder,
    redis_client: redis.Redis,
    overrides: dict[str, object],
    field: str,
) -> None:
    assert set(field_errors(submit(client, valid_body(**overrides)))) == {field}
    assert no_run_recorded(redis_client, dispatched)


def test_missing_user_id(client: FlaskClient) -> None:
    body = valid_body()
    del body["user_id"]
    assert field_errors(submit(client, body)) == {"user_id": ["Missing data for required field."]}


def test_missing_corpus_names_both_ways_to_give_one(client: FlaskClient) -> None:
    body = valid_body()
    del body["corpus_path"]
    assert field_errors(submit(client, body)) == {
        "corpus_id": ["give exactly one of corpus_id and corpus_path"],
        "corpus_path": ["give exactly one of corpus_id and corpus_path"],
    }


def test_empty_json_body_names_every_required_field(client: FlaskClient) -> None:
    response = client.post("/runs/train", data="", content_type="application/json")
    assert set(field_errors(response)) == {"user_id", "corpus_id", "corpus_path"}


@pytest.mark.parametrize("raw", ["[1, 2]", "null", '"text"'])
def test_a_body_that_is_not_an_object_is_422(client: FlaskClient, raw: str) -> None:
    response = client.post("/runs/train", data=raw, content_type="application/json")
    assert set(field_errors(response)) == {"_schema"}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_learning_rate_is_422(client: FlaskClient, literal: str) -> None:
    raw = '{"corpus_path": "notes.txt", "user_id": 1, "learning_rate": ' + literal + "}"
    response = client.post("/runs/train", data=raw, content_type="application/json")
    assert set(field_errors(response)) == {"learning_rate"}


def test_configured_maximums(settings: Settings, redis_client: redis.Redis) -> None:
    app, dispatched = app_with(replace(settings, max_epochs=3, max_seq_len=64, max_batch_size=4))
    client = app.test_client()
    over = submit(client, valid_body(num_epochs=4, max_seq_len=65, batch_size=5))
    assert field_errors(over) == {
        "num_epochs": ["must be at most 3"],
        "max_seq_len": ["must be at most 64"],
        "batch_size": ["must be at most 4"],
    }
    assert no_run_recorded(redis_client, dispatched)
    at_limit = submit(client, valid_body(num_epochs=3, max_seq_len=64, batch_size=4))
    assert at_limit.status_code == 202
    assert len(dispatched.sent) == 1


def test_default_max_seq_len_over_a_lowered_maximum_is_rejected(settings: Settings) -> None:
    app, _ = app_with(replace(settings, max_seq_len=64))
    assert field_errors(submit(app.test_client(), valid_body())) == {"max_seq_len": ["must be at most 64"]}


def test_model_messages_name_the_choices(client: FlaskClient) -> None:
    assert field_errors(submit(client, valid_body(model_family="mamba"))) == {
        "model_family": [f"must be one of {sorted(MODEL_FAMILIES)}"]
    }
    assert field_errors(submit(client, valid_body(model_size="huge"))) == {
        "model_size": [f"must be one of {sorted(MODEL_FAMILIES['gpt2'])}"]
    }
    assert field_errors(submit(client, valid_body(tokenizer_id="bert"))) == {
        "tokenizer_id": ["unknown tokenizer 'bert', or not ready yet; use \"auto\" or a completed tokenizer"]
    }


def test_every_problem_is_reported_at_once(client: FlaskClient) -> None:
    response = submit(client, valid_body(model_family="mamba", tokenizer_id="x", corpus_path="missing.txt"))
    assert set(field_errors(response)) == {"model_family", "tokenizer_id", "corpus_path"}


# --------------------------------------------------------------------------------------- status


def test_status_of_an_unknown_run_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.get("/runs/no-such-run"), 404, "NOT_FOUND")
    assert body["message"] == "no run 'no-such-run'"


def test_status_follows_the_run_record(client: FlaskClient, redis_client: redis.Redis) -> None:
    run_id = json_of(submit(client, valid_body()))["run_id"]
    assert isinstance(run_id, str)
    store = RunStore(redis_client)
    assert store.claim(run_id, "worker-a", lease_s=30, now=1700000001.5)
    store.save_progress(run_id, {"epoch": 1, "total_epochs": 1, "step": 3, "loss": 2.5, "ts": 1700000002.0})
    running = json_of(client.get(f"/runs/{run_id}"))
    assert running["status"] == "running"
    assert running["last_heartbeat_ts"] == 1700000001.5
    assert running["started_at"] == 1700000001.5
    assert running["attempt"] == 1
    assert running["progress"] == {"epoch": 1, "total_epochs": 1, "step": 3, "loss": 2.5, "ts": 1700000002.0}

    assert store.finish(
        run_id, "completed", "done", 1700000009.0, loss=1.25, perplexity=3.5, artifact_path="/a"
    )
    done = json_of(client.get(f"/runs/{run_id}"))
    assert done["status"] == "completed"
    assert done["finished_at"] == 1700000009.0
    assert done["loss"] == 1.25
    assert done["perplexity"] == 3.5
    assert done["artifact_path"] == "/a"
    assert done["message"] == "done"


# ------------------------------------------------------------------------------- error envelope


def test_invalid_json_is_400(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    response = client.post("/runs/train", data="{not json", content_type="application/json")
    body = assert_envelope(response, 400, "BAD_REQUEST")
    assert "errors" not in body
    assert body["message"] == "json: Invalid JSON body."
    assert not dispatched.sent


def test_json_nested_too_deeply_is_400(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    response = client.post("/runs/train", data="[" * 100_000, content_type="application/json")
    body = assert_envelope(response, 400, "BAD_REQUEST")
    assert body["message"] == "the body is nested too deeply"
    assert not dispatched.sent


def test_unknown_route_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.get("/nowhere"), 404, "NOT_FOUND")
    assert body["message"] == "no such resource"


def test_wrong_method_is_405_with_allow(client: FlaskClient) -> None:
    response = client.patch("/runs/abc", json={})
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")
    assert {"GET", "DELETE"} <= set(response.headers["Allow"].split(", "))
    response = client.put("/runs/train", json={})
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]


def test_body_over_the_limit_is_413(settings: Settings, redis_client: redis.Redis) -> None:
    app, dispatched = app_with(replace(settings, max_body_bytes=256))
    client = app.test_client()
    response = submit(client, valid_body(corpus_path="x" * 300))
    body = assert_envelope(response, 413, "PAYLOAD_TOO_LARGE")
    assert body["message"] == "request body too large"
    assert no_run_recorded(redis_client, dispatched)
    assert submit(client, valid_body()).status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/json"])
def test_non_json_content_type_is_415(
    client: FlaskClient, dispatched: DispatchRecorder, content_type: str
) -> None:
    response = client.post(
        "/runs/train", data='{"corpus_path":"notes.txt","user_id":1}', content_type=content_type
    )
    assert_envelope(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert not dispatched.sent


def test_json_with_a_charset_is_accepted(client: FlaskClient) -> None:
    response = client.post(
        "/runs/train",
        data='{"corpus_path":"notes.txt","user_id":1}',
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 202


@pytest.fixture
def crashing_app(settings: Settings, redis_client: redis.Redis) -> Flask:
    app = create_app(settings, dispatch=DispatchRecorder())

    def boom() -> str:
        raise RuntimeError("secret detail")

    def teapot() -> str:
        abort(418)
        return "unreachable"

    def not_implemented() -> str:
        abort(501)
        return "unreachable"

    def odd_errors() -> str:
        abort(
            422,
            errors={
                "json": {"nested": {"inner": ["too big"], "deeper": {"x": ["bad"]}}, "plain": "just text"},
                "query": ["not keyed by field"],
            },
        )
        return "unreachable"

    app.add_url_rule("/boom", view_func=boom)
    app.add_url_rule("/teapot", view_func=teapot)
    app.add_url_rule("/not-implemented", view_func=not_implemented)
    app.add_url_rule("/odd-errors", view_func=odd_errors)
    return app


def test_crash_is_500_without_its_text(crashing_app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="trainer_api.errors"):
        response = crashing_app.test_client().get("/boom", headers={"X-Request-ID": "trace-500"})
    body = assert_envelope(response, 500, "INTERNAL")
    assert body["request_id"] == "trace-500"
    assert "secret detail" not in response.get_data(as_text=True)
    assert "RuntimeError" not in response.get_data(as_text=True)
    logged = [record for record in caplog.records if record.message == "unhandled error"]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], RuntimeError)


def test_unlisted_client_error_is_bad_request(crashing_app: Flask) -> None:
    body = assert_envelope(crashing_app.test_client().get("/teapot"), 418, "BAD_REQUEST")
    assert "teapot" in str(body["message"]).lower()


def test_unlisted_server_error_is_internal(crashing_app: Flask) -> None:
    assert_envelope(crashing_app.test_client().get("/not-implemented"), 501, "INTERNAL")


def test_nested_and_plain_field_errors_are_flattened(crashing_app: Flask) -> None:
    fields = field_errors(crashing_app.test_client().get("/odd-errors"))
    assert fields == {"nested": ["inner: too big", "deeper: x: bad"], "plain": ["just text"]}


@pytest.mark.parametrize("failure", [redis.ConnectionError("down"), OperationalError("broker down")])
def test_dispatch_unavailable_is_503_and_the_run_ends_failed(
    settings: Settings, redis_client: redis.Redis, failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    def dispatch(task: Task) -> None:
        raise failure

    client = create_app(settings, dispatch=dispatch).test_client()
    with caplog.at_level(logging.WARNING, logger="trainer_api.errors"):
        response = submit(client, valid_body())
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert "down" not in str(body["message"])
    assert any("backing service unavailable" in record.message for record in caplog.records)
    record = RunStore(redis_client).get(only_run_id(redis_client))
    assert record is not None
    assert record.status == "failed"
    assert record.error_kind == "system"
    assert record.finished_at is not None
    assert record.message == "could not queue the run; nothing was trained"


def test_dispatch_crash_is_500_and_the_run_ends_failed(settings: Settings, redis_client: redis.Redis) -> None:
    def dispatch(task: Task) -> None:
        raise ValueError("secret detail")

    response = submit(create_app(settings, dispatch=dispatch).test_client(), valid_body())
    assert_envelope(response, 500, "INTERNAL")
    assert "secret detail" not in response.get_data(as_text=True)
    record = RunStore(redis_client).get(only_run_id(redis_client))
    assert record is not None
    assert record.status == "failed"


@pytest.fixture
def unreachable(settings: Settings) -> Settings:
    return replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")


def test_readyz_answers_503_when_redis_is_down(unreachable: Settings) -> None:
    client = create_app(unreachable, dispatch=DispatchRecorder()).test_client()
    body = assert_envelope(client.get("/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "Redis is unreachable"
    assert client.get("/healthz").status_code == 200


def test_status_answers_503_when_redis_is_down(unreachable: Settings) -> None:
    client = create_app(unreachable, dispatch=DispatchRecorder()).test_client()
    assert_envelope(client.get("/runs/abc"), 503, "SERVICE_UNAVAILABLE")


def test_submit_answers_503_when_redis_is_down(unreachable: Settings) -> None:
    dispatched = DispatchRecorder()
    client = create_app(unreachable, dispatch=dispatched).test_client()
    assert_envelope(submit(client, valid_body()), 503, "SERVICE_UNAVAILABLE")
    assert not dispatched.sent


# ------------------------------------------------------------------------------------ health and docs


def test_healthz_and_readyz(client: FlaskClient) -> None:
    assert json_of(client.get("/healthz")) == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert json_of(ready) == {"status": "ready", "redis": "ok", "store": "ok"}


def test_readyz_reports_the_store_alongside_redis(
    settings: Settings,
    redis_client: redis.Redis,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    on_s3 = replace(settings, artifacts_root=f"{s3_bucket}/artifacts", runs_root=f"{s3_bucket}/runs")
    assert json_of(app_with(on_s3)[0].test_client().get("/readyz"))["store"] == "ok"
    missing_bucket = replace(on_s3, runs_root="s3://no-such-bucket-here/runs")
    body = assert_envelope(
        app_with(missing_bucket)[0].test_client().get("/readyz"), 503, "SERVICE_UNAVAILABLE"
    )
    assert body["message"] == "the file store is unreachable"
    # Where it is and why it failed is for operators, in the log.
    assert "s3://no-such-bucket-here/runs" in caplog.text
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    away = replace(on_s3, store_timeout_s=1)
    assert_envelope(app_with(away)[0].test_client().get("/readyz"), 503, "SERVICE_UNAVAILABLE")


def test_readyz_is_503_when_the_store_refuses_the_credentials(
    settings: Settings, redis_client: redis.Redis, wrong_credentials: str, caplog: pytest.LogCaptureFixture
) -> None:
    refused = replace(settings, artifacts_root="s3://refused/artifacts", store_timeout_s=2)
    body = assert_envelope(app_with(refused)[0].test_client().get("/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "the file store is unreachable"
    assert f"the object store s3://refused/artifacts at {wrong_credentials} failed" in caplog.text


def test_openapi_documents_the_run_routes(client: FlaskClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = json_of(response)
    paths = spec["paths"]
    assert isinstance(paths, dict)
    assert "/runs/train" in paths
    assert "/runs/{run_id}" in paths
    train = paths["/runs/train"]
    assert isinstance(train, dict)
    assert "post" in train
    status = paths["/runs/{run_id}"]
    assert isinstance(status, dict)
    assert "get" in status


def test_docs_page(client: FlaskClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"


# --------------------------------------------------------------------------------------- X-Request-ID


@pytest.mark.parametrize(
    "offered", ["abc-123", "a b~!@#$%^&*()_+{}|:<>?", "x" * 128, "0", "550e8400-e29b-41d4-a716-446655440000"]
)
def test_valid_request_id_is_echoed(client: FlaskClient, offered: str) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": offered}).headers["X-Request-ID"] == offered


def test_valid_request_id_is_echoed_in_error_bodies(client: FlaskClient) -> None:
    response = client.get("/runs/none", headers={"X-Request-ID": "caller-trace-1"})
    body = assert_envelope(response, 404, "NOT_FOUND")
    assert body["request_id"] == "caller-trace-1"


@pytest.mark.parametrize("offered", ["x" * 129, "a\x01b", "tab\there", "caf\xe9", "del\x7f", ""])
def test_invalid_request_id_is_replaced(client: FlaskClient, offered: str) -> None:
    response = client.get("/runs/none", headers={"X-Request-ID": offered})
    replaced = response.headers["X-Request-ID"]
    assert replaced != offered
    assert 1 <= len(replaced) <= 128
    assert replaced.isascii()
    assert replaced.isprintable()
    assert json_of(response)["request_id"] == replaced


def test_absent_request_id_is_generated_per_request(client: FlaskClient) -> None:
    first = client.get("/healthz").headers["X-Request-ID"]
    second = client.get("/healthz").headers["X-Request-ID"]
    assert first
    assert second
    assert first != second
    accepted = submit(client, valid_body())
    assert accepted.status_code == 202
    assert accepted.headers["X-Request-ID"] not in (first, second)


# -------------------------------------------------------------------------------------------- API key


@pytest.fixture
def keyed_client(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    app, _ = app_with(replace(settings, api_key="k3y"))
    return app.test_client()


def test_missing_api_key_is_401(keyed_client: FlaskClient, redis_client: redis.Redis) -> None:
    body = assert_envelope(submit(keyed_client, valid_body()), 401, "UNAUTHORIZED")
    assert body["message"] == "a valid X-Api-Key header is required"
    assert not redis_client.keys("trainer:runs:*")
    assert_envelope(keyed_client.get("/runs/abc"), 401, "UNAUTHORIZED")
    # Even unknown routes do not reveal themselves without a key.
    assert_envelope(keyed_client.get("/nowhere"), 401, "UNAUTHORIZED")


@pytest.mark.parametrize("wrong", ["k3", "k3y ", "K3Y", "k3yk3y", "wrong"])
def test_wrong_api_key_is_401(keyed_client: FlaskClient, wrong: str) -> None:
    response = submit(keyed_client, valid_body(), headers={"X-Api-Key": wrong})
    assert_envelope(response, 401, "UNAUTHORIZED")


def test_right_api_key_passes(keyed_client: FlaskClient) -> None:
    headers = {"X-Api-Key": "k3y"}
    accepted = submit(keyed_client, valid_body(), headers=headers)
    assert accepted.status_code == 202
    run_id = json_of(accepted)["run_id"]
    assert keyed_client.get(f"/runs/{run_id}", headers=headers).status_code == 200
    assert_envelope(keyed_client.get("/runs/none", headers=headers), 404, "NOT_FOUND")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_public_paths_need_no_key(keyed_client: FlaskClient, path: str) -> None:
    assert keyed_client.get(path).status_code == 200


def test_paths_under_docs_need_no_key(keyed_client: FlaskClient) -> None:
    assert_envelope(keyed_client.get("/docs/missing.js"), 404, "NOT_FOUND")


# ------------------------------------------------------------------------------------- app and services


def test_create_app_reads_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis, corpus_root: Path
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("APP__CORPUS_ROOT", str(corpus_root))
    monkeypatch.setenv("APP__MAX_EPOCHS", "2")
    monkeypatch.setenv("SECURITY__API_KEY", "from-env")
    monkeypatch.setenv("APP__ALLOW_OFFLINE_QUEUES", "true")  # no worker runs in this test
    dispatched = DispatchRecorder()
    app = create_app(dispatch=dispatched)
    with app.app_context():
        assert services().settings.max_epochs == 2
        assert services().settings.allow_offline_queues
    client = app.test_client()
    assert client.get("/runs/x").status_code == 401
    headers = {"X-Api-Key": "from-env"}
    assert set(field_errors(submit(client, valid_body(num_epochs=3), headers=headers))) == {"num_epochs"}
    assert submit(client, valid_body(num_epochs=2), headers=headers).status_code == 202
    assert len(dispatched.sent) == 1


def test_default_dispatch_sends_the_train_task_by_name(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, redis_client: redis.Redis
) -> None:
    sent: list[tuple[str, list[str], str, bool, str | None, int]] = []

    def send_task(
        name: str,
        args: list[str],
        task_id: str,
        ignore_result: bool,
        queue: str | None,
        priority: int,
        producer: object,
    ) -> None:
        assert isinstance(producer, Batching), "sent through a producer that batches the task and its event"
        sent.append((name, args, task_id, ignore_result, queue, priority))

    monkeypatch.setattr(celery_app, "send_task", send_task)
    client = create_app(settings).test_client()
    accepted = json_of(submit(client, valid_body()))
    # Only published (no subscription to a Celery result that nobody reads), to the run's own queue,
    # behind any run that goes back to it.
    assert sent == [
        (TRAIN_TASK, [accepted["run_id"]], accepted["job_id"], True, "training", NEW_TASK_PRIORITY)
    ]


def test_services_outside_create_app_is_a_type_error(app: Flask) -> None:
    app.extensions[EXTENSION] = "not services"
    with app.app_context(), pytest.raises(TypeError, match="create_app"):
        services()


# ----------------------------------------------------------------------------- schema-level helpers


def test_train_request_round_trips_through_a_mapping() -> None:
    request = TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=64,
        num_epochs=2,
        batch_size=4,
        learning_rate=1e-3,
        corpus_path="/c/notes.txt",
        tokenizer_id="auto",
        user_id=SNOWFLAKE,
        seed=1,
    )
    assert TrainRequest.from_mapping(request.to_mapping()) == request


def test_train_request_accepts_an_integer_learning_rate() -> None:
    mapping = valid_body(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=64,
        num_epochs=1,
        batch_size=1,
        learning_rate=1,
        tokenizer_id="auto",
        seed=0,
    )
    loaded = TrainRequest.from_mapping(mapping)
    assert loaded.learning_rate == 1.0
    assert isinstance(loaded.learning_rate, float)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_family", 5, "train request field 'model_family' must be a string"),
        ("corpus_path", None, "train request field 'corpus_path' must be a string"),
        ("num_epochs", "1", "train request field 'num_epochs' must be an integer"),
        ("user_id", True, "train request field 'user_id' must be an integer"),
        ("learning_rate", "0.1", "train request field 'learning_rate' must be a number"),
        ("learning_rate", False, "train request field 'learning_rate' must be a number"),
    ],
)
def test_train_request_rejects_mistyped_mappings(field: str, value: object, message: str) -> None:
    mapping = valid_body(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=64,
        num_epochs=1,
        batch_size=1,
        learning_rate=0.1,
        tokenizer_id="auto",
        seed=0,
    )
    mapping[field] = value
    with pytest.raises(TypeError) as raised:
        TrainRequest.from_mapping(mapping)
    assert str(raised.value) == message


def test_model_catalogue() -> None:
    assert model_shape(DEFAULT_FAMILY, DEFAULT_SIZE) == MODEL_FAMILIES["gpt2"]["small"]
    assert model_shape("gpt2", "huge") is None
    assert model_shape("mamba", "small") is None
    tiny = model_shape("gpt2", "tiny")
    assert tiny is not None
    assert tiny == ModelShape(n_layer=2, n_embd=128, n_head=2)
    # 2 layers of (12·128² + 13·128), embeddings 8192·128 + 128·128, final norm 2·128.
    assert reference_params("gpt2", "tiny") == 1_461_760
    for family, sizes in MODEL_FAMILIES.items():
        assert set(sizes) >= {"tiny", "small", "medium"}
        for size, shape in sizes.items():
            assert shape.n_embd % shape.n_head == 0
            assert reference_params(family, size) > 0


def test_models_lists_families_and_sizes_with_parameter_counts(client: FlaskClient) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    body = json_of(response)
    assert body["default_family"] == "gpt2"
    assert body["default_size"] == "small"
    families = body["families"]
    assert isinstance(families, list)
    assert [family["family"] for family in families] == list(MODEL_FAMILIES)
    gpt2 = families[0]
    assert gpt2["family"] == "gpt2"
    assert [size["size"] for size in gpt2["sizes"]] == ["tiny", "small", "medium"]
    assert gpt2["sizes"][0] == {"size": "tiny", "n_layer": 2, "n_embd": 128, "n_head": 2, "params": 1461760}
    for family in families:
        for size in family["sizes"]:
            assert size["params"] == reference_params(family["family"], size["size"])


LONG_PATHS = (
    "/runs/r1/events",
    "/runs/r1/logs/stream?tail=5",
    "/runs/r1/model.zip?expires=1&signature=abc",
    "/runs/r1/artifact/model.safetensors",
)


def test_a_process_without_threads_sends_followers_and_downloads_to_the_stream_line(
    settings: Settings,
) -> None:
    stream_url = "https://stream.example.com"
    app = create_app(replace(settings, stream_url=stream_url), dispatch=DispatchRecorder())
    client = app.test_client()
    for path in LONG_PATHS:
        moved = client.get(path, headers={"X-Request-ID": "req-1"})
        assert moved.status_code == 307, path
        assert moved.headers["Location"] == f"{stream_url}{path}"
        assert moved.headers["X-Request-ID"] == "req-1"
    # Plain requests are answered here, and a threaded process (the stream line itself) serves the long ones.
    assert client.get("/runs/r1").status_code == 404
    assert client.get("/runs/r1/logs").status_code != 307
    for path in LONG_PATHS:
        assert client.get(path, environ_overrides={"wsgi.multithread": True}).status_code != 307, path


def test_without_a_stream_line_every_request_is_served_where_it_is_asked(settings: Settings) -> None:
    client = create_app(settings, dispatch=DispatchRecorder()).test_client()
    for path in LONG_PATHS:
        # Answered here: no such run (404), or a link that is not signed right (403).
        assert client.get(path).status_code in (403, 404), path
    assert Settings.from_env({"APP__STREAM_URL": "http://s:8001/"}).stream_url == "http://s:8001"
    assert Settings.from_env({}).stream_url is None
