"""Tokenizer requests and status through Flask's test client; the worker's records are written by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import DispatchRecorder
from tests.test_api import (
    SNOWFLAKE,
    assert_envelope,
    field_errors,
    json_of,
    no_run_recorded,
    stored_request,
    submit,
    valid_body,
)
from tests.test_corpora_api import EXACTLY_ONE, uploaded_id
from trainer_api import create_app
from trainer_api.services import Task
from trainer_store.corpora import UPLOADS_FOLDER
from trainer_store.jobs import JobStore, tokenizer_key
from trainer_store.settings import Settings
from trainer_tasks.app import TOKENIZER_TASK, TRAIN_TASK

WORKER_RESULT: dict[str, object] = {
    "vocab_size": 4096,
    "tokens_per_char": 0.31,
    "multibyte_coverage": 0.875,
    "artifact_path": "/artifacts/tokenizers/t1",
}


def request_tokenizer(client: FlaskClient, **body: object) -> TestResponse:
    return client.post("/tokenizers/train", json=body)


def accepted_tokenizer(client: FlaskClient, **body: object) -> str:
    response = request_tokenizer(client, **{"corpus_path": "notes.txt", **body})
    assert response.status_code == 202, response.get_data(as_text=True)
    tokenizer_id = json_of(response)["tokenizer_id"]
    assert isinstance(tokenizer_id, str)
    return tokenizer_id


def no_job_recorded(redis_client: redis.Redis, dispatched: DispatchRecorder) -> bool:
    return not redis_client.keys("trainer:tokenizers:*") and not dispatched.calls


def finish(redis_client: redis.Redis, tokenizer_id: str, result: dict[str, object] | None) -> None:
    """What the worker does: start the job, then complete it with its result (or fail it for None)."""
    jobs = JobStore(redis_client)
    key = tokenizer_key(tokenizer_id)
    jobs.start(key)
    if result is None:
        jobs.fail(key, "the corpus has too few distinct bytes", now=1700000100.0)
    else:
        jobs.complete(key, result, now=1700000100.0)


# ------------------------------------------------------------------------------------------ request


def test_request_answers_202_records_the_job_and_queues_it(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis, corpus_root: Path
) -> None:
    response = request_tokenizer(client, corpus_path="notes.txt")
    assert response.status_code == 202
    body = json_of(response)
    assert set(body) == {"tokenizer_id", "job_id"}
    tokenizer_id, job_id = body["tokenizer_id"], body["job_id"]
    assert isinstance(tokenizer_id, str)
    assert isinstance(job_id, str)
    assert tokenizer_id != job_id
    assert dispatched.calls == [(TOKENIZER_TASK, [tokenizer_id], job_id)]
    record = JobStore(redis_client).get(tokenizer_key(tokenizer_id))
    assert record is not None
    assert record.status == "queued"
    assert record.request == {
        "method": "bpe",
        "vocab_size": 8192,
        "min_frequency": 2,
        "holdout_fraction": 0.1,
        "corpus_path": "notes.txt",
        "corpus_id": None,
    }


def test_explicit_values_and_an_uploaded_corpus_are_recorded(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    corpus_id = uploaded_id(client)
    tokenizer_id = json_of(
        request_tokenizer(
            client, method="bpe", vocab_size=256, min_frequency=1, holdout_fraction=0.5, corpus_id=corpus_id
        )
    )["tokenizer_id"]
    assert isinstance(tokenizer_id, str)
    record = JobStore(redis_client).get(tokenizer_key(tokenizer_id))
    assert record is not None
    assert record.request == {
        "method": "bpe",
        "vocab_size": 256,
        "min_frequency": 1,
        "holdout_fraction": 0.5,
        "corpus_path": f"{UPLOADS_FOLDER}/{corpus_id}.txt",
        "corpus_id": corpus_id,
    }


def test_the_largest_vocabulary_is_accepted(client: FlaskClient) -> None:
    assert accepted_tokenizer(client, vocab_size=65536)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"method": "wordpiece"}, "method"),
        ({"method": 1}, "method"),
        ({"vocab_size": 255}, "vocab_size"),
        ({"vocab_size": 65537}, "vocab_size"),
        ({"vocab_size": "8192"}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"vocab_size": 1000.5}, "vocab_size"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"min_frequency": None}, "min_frequency"),
        ({"holdout_fraction": 0}, "holdout_fraction"),
        ({"holdout_fraction": 0.51}, "holdout_fraction"),
        ({"holdout_fraction": "much"}, "holdout_fraction"),
        ({"corpus_path": "../outside.txt"}, "corpus_path"),
        ({"corpus_path": "missing.txt"}, "corpus_path"),
        ({"corpus_path": ""}, "corpus_path"),
        ({"seed": 1}, "seed"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: FlaskClient,
    dispatched: DispatchRecorder,
    redis_client: redis.Redis,
    overrides: dict[str, object],
    field: str,
) -> None:
    response = request_tokenizer(client, **{"corpus_path": "notes.txt", **overrides})
    assert set(field_errors(response)) == {field}
    assert no_job_recorded(redis_client, dispatched)


def test_a_nan_holdout_is_422(client: FlaskClient) -> None:
    raw = '{"corpus_path": "notes.txt", "holdout_fraction": NaN}'
    response = client.post("/tokenizers/train", data=raw, content_type="application/json")
    assert set(field_errors(response)) == {"holdout_fraction"}


NULL = "Field may not be null."


@pytest.mark.parametrize(
    ("corpus", "expected"),
    [
        ({}, {"corpus_id": EXACTLY_ONE, "corpus_path": EXACTLY_ONE}),
        (
            {"corpus_path": "notes.txt", "corpus_id": "abc"},
            {"corpus_id": EXACTLY_ONE, "corpus_path": EXACTLY_ONE},
        ),
        (
            {"corpus_id": None, "corpus_path": None},
            {"corpus_id": [NULL, *EXACTLY_ONE], "corpus_path": [NULL, *EXACTLY_ONE]},
        ),
    ],
)
def test_exactly_one_corpus_is_named(
    client: FlaskClient,
    dispatched: DispatchRecorder,
    redis_client: redis.Redis,
    corpus: dict[str, object],
    expected: dict[str, list[str]],
) -> None:
    assert field_errors(request_tokenizer(client, **corpus)) == expected
    assert no_job_recorded(redis_client, dispatched)


def test_an_unknown_corpus_id_is_422(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    assert field_errors(request_tokenizer(client, corpus_id="nope")) == {
        "corpus_id": ["unknown corpus 'nope'"]
    }
    assert no_job_recorded(redis_client, dispatched)


def test_a_dispatch_that_fails_marks_the_job_failed(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    def dispatch(task: Task) -> None:
        raise redis.ConnectionError("broker down")

    client = create_app(settings, dispatch=dispatch).test_client()
    with caplog.at_level(logging.WARNING, logger="trainer_api.errors"):
        assert_envelope(request_tokenizer(client, corpus_path="notes.txt"), 503, "SERVICE_UNAVAILABLE")
    (key,) = redis_client.keys("trainer:tokenizers:*")
    assert isinstance(key, bytes)
    record = JobStore(redis_client).get(key.decode())
    assert record is not None
    assert record.status == "failed"
    assert record.message == "could not queue the job; nothing was done"
    assert record.finished_at is not None


def test_a_dispatch_that_crashes_is_500_and_the_job_failed(
    settings: Settings, redis_client: redis.Redis
) -> None:
    def dispatch(task: Task) -> None:
        raise ValueError("secret detail")

    response = request_tokenizer(
        create_app(settings, dispatch=dispatch).test_client(), corpus_path="notes.txt"
    )
    assert_envelope(response, 500, "INTERNAL")
    assert "secret detail" not in response.get_data(as_text=True)
    (key,) = redis_client.keys("trainer:tokenizers:*")
    assert isinstance(key, bytes)
    record = JobStore(redis_client).get(key.decode())
    assert record is not None
    assert record.status == "failed"


# ------------------------------------------------------------------------------------------- status


def test_status_of_a_queued_tokenizer(client: FlaskClient) -> None:
    tokenizer_id = accepted_tokenizer(client)
    body = json_of(client.get(f"/tokenizers/{tokenizer_id}"))
    assert isinstance(body["created_at"], float)
    assert body == {
        "tokenizer_id": tokenizer_id,
        "status": "queued",
        "message": "queued",
        "created_at": body["created_at"],
        "finished_at": None,
        "stats": None,
        "artifact_path": None,
    }


def test_status_of_a_running_tokenizer(client: FlaskClient, redis_client: redis.Redis) -> None:
    tokenizer_id = accepted_tokenizer(client)
    JobStore(redis_client).start(tokenizer_key(tokenizer_id))
    body = json_of(client.get(f"/tokenizers/{tokenizer_id}"))
    assert (body["status"], body["message"], body["stats"], body["artifact_path"]) == (
        "running",
        "running",
        None,
        None,
    )


def test_status_of_a_completed_tokenizer_answers_its_stats(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    tokenizer_id = accepted_tokenizer(client)
    finish(redis_client, tokenizer_id, WORKER_RESULT)
    body = json_of(client.get(f"/tokenizers/{tokenizer_id}"))
    assert body["status"] == "completed"
    assert body["message"] == "completed"
    assert body["finished_at"] == 1700000100.0
    assert body["stats"] == {"vocab_size": 4096, "tokens_per_char": 0.31, "multibyte_coverage": 0.875}
    assert body["artifact_path"] == "/artifacts/tokenizers/t1"


def test_a_mistyped_or_missing_worker_value_reads_as_null(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    tokenizer_id = accepted_tokenizer(client)
    finish(redis_client, tokenizer_id, {"vocab_size": True, "tokens_per_char": 1, "multibyte_coverage": "x"})
    body = json_of(client.get(f"/tokenizers/{tokenizer_id}"))
    assert body["stats"] == {"vocab_size": None, "tokens_per_char": 1.0, "multibyte_coverage": None}
    assert body["artifact_path"] is None


def test_status_of_a_failed_tokenizer_says_why(client: FlaskClient, redis_client: redis.Redis) -> None:
    tokenizer_id = accepted_tokenizer(client)
    finish(redis_client, tokenizer_id, None)
    body = json_of(client.get(f"/tokenizers/{tokenizer_id}"))
    assert body["status"] == "failed"
    assert body["message"] == "the corpus has too few distinct bytes"
    assert body["stats"] is None
    assert body["artifact_path"] is None


def test_status_of_an_unknown_tokenizer_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.get("/tokenizers/nope"), 404, "NOT_FOUND")
    assert body["message"] == "no tokenizer 'nope'"


# ------------------------------------------------------------------------------ tokenizer_id on a run


def test_a_run_on_a_completed_tokenizer_is_accepted(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    tokenizer_id = accepted_tokenizer(client)
    finish(redis_client, tokenizer_id, WORKER_RESULT)
    response = submit(client, valid_body(tokenizer_id=tokenizer_id))
    assert response.status_code == 202
    run_id = json_of(response)["run_id"]
    assert stored_request(redis_client, run_id)["tokenizer_id"] == tokenizer_id
    assert [name for name, _, _ in dispatched.calls] == [TOKENIZER_TASK, TRAIN_TASK]


@pytest.mark.parametrize("state", ["queued", "running", "failed"])
def test_a_run_on_a_tokenizer_that_is_not_ready_is_422(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder, state: str
) -> None:
    tokenizer_id = accepted_tokenizer(client)
    if state == "running":
        JobStore(redis_client).start(tokenizer_key(tokenizer_id))
    if state == "failed":
        finish(redis_client, tokenizer_id, None)
    assert field_errors(submit(client, valid_body(tokenizer_id=tokenizer_id))) == {
        "tokenizer_id": [
            f'unknown tokenizer {tokenizer_id!r}, or not ready yet; use "auto" or a completed tokenizer'
        ]
    }
    assert not dispatched.sent


def test_a_run_on_an_unknown_tokenizer_is_422(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    response = submit(client, {"corpus_path": "notes.txt", "user_id": SNOWFLAKE, "tokenizer_id": "missing"})
    assert set(field_errors(response)) == {"tokenizer_id"}
    assert no_run_recorded(redis_client, dispatched)


def test_openapi_documents_the_tokenizer_routes(client: FlaskClient) -> None:
    paths = json_of(client.get("/openapi.json"))["paths"]
    assert isinstance(paths, dict)
    assert {"202", "422"} <= set(paths["/tokenizers/train"]["post"]["responses"])
    assert {"200", "404"} <= set(paths["/tokenizers/{tokenizer_id}"]["get"]["responses"])
