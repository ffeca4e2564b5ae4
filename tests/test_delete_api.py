"""DELETE of runs, tokenizers and corpora through Flask's test client, a real Redis and local file roots:
what goes, what stays, and the 409s while queued or running work needs them."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from schemas.status import RunStatus
from scripts.devstack import free_port
from tests.test_api import assert_envelope, field_errors, json_of, submit, valid_body
from tests.test_tokenizers_api import WORKER_RESULT, accepted_tokenizer, finish
from trainer_api.services import EXTENSION, Services, services
from trainer_store.jobs import JobStore, evaluation_key, tokenizer_key
from trainer_store.runs import (
    RunStore,
    run_events_key,
    run_key,
    run_log_key,
    user_runs_key,
)
from trainer_store.settings import Settings
from trainer_store.storage import Storage

USER = 4242


def queued_run(client: FlaskClient, **body: object) -> str:
    response = submit(client, valid_body(user_id=USER, **body))
    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = json_of(response)["run_id"]
    assert isinstance(run_id, str)
    return run_id


def end(store: RunStore, run_id: str, status: RunStatus = "completed") -> None:
    """What a worker does: claim the run, then record how it ended."""
    assert store.claim(run_id, "worker-a", 60, time.time())
    assert store.finish(run_id, status, status, time.time())
    store.release(run_id, "worker-a")


def write_run_files(settings: Settings, run_id: str) -> list[Path]:
    """The files a trained run leaves in local roots: checkpoints and splits, the model folder."""
    files = [
        Path(settings.runs_root) / run_id / "checkpoints" / "last.ckpt",
        Path(settings.runs_root) / run_id / "splits" / "validation.pt",
        Path(settings.artifacts_root) / "models" / run_id / "model.safetensors",
        Path(settings.artifacts_root) / "models" / run_id / "manifest.json",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return files


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    return RunStore(redis_client)


# ------------------------------------------------------------------------------------------------ runs


def test_deleting_a_finished_run_removes_its_keys_and_files_only(
    client: FlaskClient, store: RunStore, redis_client: redis.Redis, settings: Settings
) -> None:
    doomed, kept = queued_run(client), queued_run(client)
    end(store, doomed)
    end(store, kept, "failed")
    doomed_files, kept_files = write_run_files(settings, doomed), write_run_files(settings, kept)
    JobStore(redis_client).create(evaluation_key(doomed), {"split": "validation"}, time.time())
    JobStore(redis_client).complete(evaluation_key(doomed), {"loss": 2.0}, time.time())
    redis_client.xadd(run_log_key(doomed), {"line": "epoch 1"})
    redis_client.xadd(run_events_key(doomed), {"event": "{}"})

    response = client.delete(f"/runs/{doomed}")
    assert response.status_code == 204, response.get_data(as_text=True)
    assert response.get_data() == b""
    for key in (run_key(doomed), evaluation_key(doomed), run_log_key(doomed), run_events_key(doomed)):
        assert redis_client.exists(key) == 0, key
    assert not any(path.exists() for path in doomed_files)
    assert not (Path(settings.runs_root) / doomed).exists()
    assert not (Path(settings.artifacts_root) / "models" / doomed).exists()
    assert all(path.exists() for path in kept_files)
    assert redis_client.zrange(user_runs_key(USER), 0, -1) == [kept.encode()]
    assert_envelope(client.get(f"/runs/{doomed}"), 404, "NOT_FOUND")
    assert_envelope(client.delete(f"/runs/{doomed}"), 404, "NOT_FOUND")
    listed = json_of(client.get(f"/runs?user_id={USER}"))["runs"]
    assert isinstance(listed, list)
    assert [run["run_id"] for run in listed] == [kept]


def test_a_run_without_files_is_deleted_too(client: FlaskClient, store: RunStore) -> None:
    run_id = queued_run(client)
    assert store.transition(run_id, ("queued",), "canceled", {"message": "canceled"})
    assert client.delete(f"/runs/{run_id}").status_code == 204
    assert store.get(run_id) is None


def test_a_queued_or_running_run_is_409_and_kept(
    client: FlaskClient, store: RunStore, settings: Settings
) -> None:
    run_id = queued_run(client)
    files = write_run_files(settings, run_id)
    body = assert_envelope(client.delete(f"/runs/{run_id}"), 409, "CONFLICT")
    assert body["message"] == (
        f"run {run_id!r} is queued; cancel it (POST /runs/{run_id}/cancel) and delete it once it has ended"
    )
    assert store.claim(run_id, "worker-a", 60, time.time())
    body = assert_envelope(client.delete(f"/runs/{run_id}"), 409, "CONFLICT")
    assert "is running" in str(body["message"])
    assert all(path.exists() for path in files)
    record = store.get(run_id)
    assert record is not None
    assert record.status == "running"


def test_a_run_under_evaluation_is_409(
    client: FlaskClient, store: RunStore, redis_client: redis.Redis
) -> None:
    run_id = queued_run(client)
    end(store, run_id)
    assert client.post(f"/runs/{run_id}/evaluate", json={}).status_code == 202
    body = assert_envelope(client.delete(f"/runs/{run_id}"), 409, "CONFLICT")
    assert body["message"] == f"an evaluation of run {run_id!r} is queued; delete it once that ends"
    JobStore(redis_client).fail(evaluation_key(run_id), "broke", time.time())
    assert client.delete(f"/runs/{run_id}").status_code == 204


@pytest.mark.parametrize("run_id", ["nope", "abc:lease", "x" * 500])
def test_an_unknown_run_is_404(run_id: str, client: FlaskClient, store: RunStore) -> None:
    queued_run(client)
    body = assert_envelope(client.delete(f"/runs/{run_id}"), 404, "NOT_FOUND")
    assert body["message"] == f"no run {run_id!r}"


def test_a_lease_key_is_not_a_run(client: FlaskClient, store: RunStore) -> None:
    run_id = queued_run(client)
    assert store.claim(run_id, "worker-a", 60, time.time())
    for method in ("get", "delete"):
        response = client.open(f"/runs/{run_id}:lease", method=method.upper())
        assert_envelope(response, 404, "NOT_FOUND")
    assert_envelope(client.post(f"/runs/{run_id}:lease/cancel"), 404, "NOT_FOUND")
    assert store.get(run_id) is not None


def test_a_store_that_fails_is_503_and_the_run_stays(
    app: Flask,
    client: FlaskClient,
    store: RunStore,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = queued_run(client)
    end(store, run_id)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    unreachable = Storage("s3://trainer-artifacts", timeout_s=1)
    app.extensions[EXTENSION] = dataclasses.replace(services_of(app), artifact_files=unreachable)
    body = assert_envelope(client.delete(f"/runs/{run_id}"), 503, "SERVICE_UNAVAILABLE")
    assert "trainer-artifacts" not in str(body["message"])
    assert store.get(run_id) is not None, "kept, so the delete can be tried again"


def services_of(app: Flask) -> Services:
    with app.app_context():
        return services()


# ------------------------------------------------------------------------------------------ tokenizers


def completed_tokenizer(client: FlaskClient, redis_client: redis.Redis, settings: Settings) -> str:
    tokenizer_id = accepted_tokenizer(client)
    finish(redis_client, tokenizer_id, WORKER_RESULT)
    folder = Path(settings.artifacts_root) / "tokenizers" / tokenizer_id
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")
    return tokenizer_id


def test_deleting_a_tokenizer_removes_its_record_and_files(
    client: FlaskClient, redis_client: redis.Redis, settings: Settings
) -> None:
    tokenizer_id = completed_tokenizer(client, redis_client, settings)
    other = completed_tokenizer(client, redis_client, settings)
    assert client.delete(f"/tokenizers/{tokenizer_id}").status_code == 204
    assert redis_client.exists(tokenizer_key(tokenizer_id)) == 0
    assert not (Path(settings.artifacts_root) / "tokenizers" / tokenizer_id).exists()
    assert (Path(settings.artifacts_root) / "tokenizers" / other / "tokenizer.json").exists()
    assert_envelope(client.get(f"/tokenizers/{tokenizer_id}"), 404, "NOT_FOUND")
    assert_envelope(client.delete(f"/tokenizers/{tokenizer_id}"), 404, "NOT_FOUND")
    assert set(field_errors(submit(client, valid_body(tokenizer_id=tokenizer_id)))) == {"tokenizer_id"}


def test_a_tokenizer_in_use_is_409_until_its_runs_end(
    client: FlaskClient, store: RunStore, redis_client: redis.Redis, settings: Settings
) -> None:
    tokenizer_id = completed_tokenizer(client, redis_client, settings)
    runs = [queued_run(client, tokenizer_id=tokenizer_id) for _ in range(2)]
    body = assert_envelope(client.delete(f"/tokenizers/{tokenizer_id}"), 409, "CONFLICT")
    assert body["message"] == (
        f"tokenizer {tokenizer_id!r} is used by 2 queued or running run(s); delete it once they have finished"
    )
    end(store, runs[0])
    assert store.transition(runs[1], ("queued",), "canceled", {"message": "canceled"})
    assert client.delete(f"/tokenizers/{tokenizer_id}").status_code == 204


def test_a_tokenizer_still_training_is_409(client: FlaskClient, redis_client: redis.Redis) -> None:
    tokenizer_id = accepted_tokenizer(client)
    body = assert_envelope(client.delete(f"/tokenizers/{tokenizer_id}"), 409, "CONFLICT")
    assert body["message"] == f"tokenizer {tokenizer_id!r} is still queued; delete it once it has finished"
    JobStore(redis_client).start(tokenizer_key(tokenizer_id))
    body = assert_envelope(client.delete(f"/tokenizers/{tokenizer_id}"), 409, "CONFLICT")
    assert "still running" in str(body["message"])
    finish(redis_client, tokenizer_id, None)  # a failed tokenizer can go
    assert client.delete(f"/tokenizers/{tokenizer_id}").status_code == 204


@pytest.mark.parametrize("tokenizer_id", ["nope", "abc:runs"])
def test_an_unknown_tokenizer_is_404(tokenizer_id: str, client: FlaskClient) -> None:
    body = assert_envelope(client.delete(f"/tokenizers/{tokenizer_id}"), 404, "NOT_FOUND")
    assert body["message"] == f"no tokenizer {tokenizer_id!r}"
    assert_envelope(client.get(f"/tokenizers/{tokenizer_id}"), 404, "NOT_FOUND")


# --------------------------------------------------------------------------------------------- corpora


def test_a_corpus_in_use_is_409_until_its_runs_end(
    client: FlaskClient, store: RunStore, redis_client: redis.Redis, settings: Settings
) -> None:
    upload = client.post(
        "/corpora", data={"file": (io.BytesIO(b"the cat sat\n"), "c.txt")}, content_type="multipart/form-data"
    )
    corpus_id = json_of(upload)["corpus_id"]
    assert isinstance(corpus_id, str)
    response = submit(client, {"corpus_id": corpus_id, "user_id": USER})
    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = str(json_of(response)["run_id"])
    body = assert_envelope(client.delete(f"/corpora/{corpus_id}"), 409, "CONFLICT")
    assert body["message"] == (
        f"corpus {corpus_id!r} is used by 1 queued or running run(s); delete it once they have finished"
    )
    assert (Path(settings.corpus_root) / "uploads" / f"{corpus_id}.txt").exists()
    end(store, run_id)
    assert client.delete(f"/corpora/{corpus_id}").status_code == 204
    assert not (Path(settings.corpus_root) / "uploads" / f"{corpus_id}.txt").exists()
    assert json.loads(client.get("/corpora").get_data()) == {"corpora": []}
