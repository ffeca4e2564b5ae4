"""A run's artifact folder through the test client, on a local root and on an object store: listing,
downloads with Range, what is never served."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from scripts.devstack import free_port
from tests.test_api import app_with, assert_envelope, json_of, submit, valid_body
from trainer_store.settings import Settings
from trainer_store.storage import Storage

MODEL_BYTES = bytes(range(256)) * 4
CONFIG_TEXT = b'{"model_type": "gpt2", "n_layer": 2}\n'
MANIFEST_TEXT = b'{"run_id": "r"}\n'


@pytest.fixture
def run_id(client: FlaskClient) -> str:
    accepted = json_of(submit(client, valid_body()))["run_id"]
    assert isinstance(accepted, str)
    return accepted


def model_dir(settings: Settings, run_id: str) -> Path:
    return Path(settings.artifacts_root) / "models" / run_id


@pytest.fixture
def artifact(settings: Settings, run_id: str, tmp_path: Path) -> Path:
    """The folder the worker writes, with things beside it and in it that must never be served."""
    folder = model_dir(settings, run_id)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(MODEL_BYTES)
    (folder / "config.json").write_bytes(CONFIG_TEXT)
    (folder / "metrics.csv").write_bytes(b"")
    (folder / "manifest.json").write_bytes(MANIFEST_TEXT)
    (folder / "nested").mkdir()
    (folder / "nested" / "inner.txt").write_text("inside a subfolder\n")
    (folder / ".manifest.json.tmp").write_text("{half written")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    (folder / "escape.txt").symlink_to(secret)
    (folder / "alias.json").symlink_to(folder / "config.json")
    checkpoints = Path(settings.runs_root) / run_id / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"checkpoint")
    return folder


# ------------------------------------------------------------------------------------------ listing


def test_listing_names_the_plain_files_with_their_sizes(
    client: FlaskClient, run_id: str, artifact: Path
) -> None:
    response = client.get(f"/runs/{run_id}/artifact")
    assert response.status_code == 200
    assert json_of(response) == {
        "run_id": run_id,
        "files": [
            {"name": "config.json", "bytes": len(CONFIG_TEXT)},
            {"name": "manifest.json", "bytes": len(MANIFEST_TEXT)},
            {"name": "metrics.csv", "bytes": 0},
            {"name": "model.safetensors", "bytes": len(MODEL_BYTES)},
        ],
    }


def test_listing_of_an_unknown_run_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.get("/runs/nope/artifact"), 404, "NOT_FOUND")
    assert body["message"] == "no run 'nope'"


def test_listing_before_the_folder_exists_is_404_saying_so(client: FlaskClient, run_id: str) -> None:
    body = assert_envelope(client.get(f"/runs/{run_id}/artifact"), 404, "NOT_FOUND")
    assert body["message"] == f"run {run_id!r} has no artifacts yet; they appear when training completes"
    assert_envelope(client.get(f"/runs/{run_id}/artifact/config.json"), 404, "NOT_FOUND")


def test_an_artifact_path_that_is_a_file_is_not_a_folder(
    client: FlaskClient, settings: Settings, run_id: str
) -> None:
    model_dir(settings, run_id).parent.mkdir(parents=True)
    model_dir(settings, run_id).write_text("not a folder")
    assert_envelope(client.get(f"/runs/{run_id}/artifact"), 404, "NOT_FOUND")


def test_a_folder_without_its_manifest_is_not_there_yet(
    client: FlaskClient, settings: Settings, run_id: str, artifact: Path
) -> None:
    """The worker writes manifest.json last: until then the folder is half written, or being written."""
    (artifact / "manifest.json").unlink()
    body = assert_envelope(client.get(f"/runs/{run_id}/artifact"), 404, "NOT_FOUND")
    assert body["message"] == f"run {run_id!r} has no artifacts yet; they appear when training completes"
    assert_envelope(client.get(f"/runs/{run_id}/artifact/config.json"), 404, "NOT_FOUND")


# ---------------------------------------------------------------------------------------- downloads


def test_download_answers_the_whole_file(client: FlaskClient, run_id: str, artifact: Path) -> None:
    response = client.get(f"/runs/{run_id}/artifact/model.safetensors")
    assert response.status_code == 200
    assert response.get_data() == MODEL_BYTES
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Length"] == str(len(MODEL_BYTES))
    assert response.headers["Content-Disposition"] == "attachment; filename=model.safetensors"
    assert response.headers["X-Request-ID"]


def test_a_json_file_keeps_its_type(client: FlaskClient, run_id: str, artifact: Path) -> None:
    response = client.get(f"/runs/{run_id}/artifact/config.json")
    assert response.mimetype == "application/json"
    assert response.get_data() == CONFIG_TEXT


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=10-19", 10, 19), ("bytes=1000-", 1000, 1023), ("bytes=-5", 1019, 1023), ("bytes=0-0", 0, 0)],
)
def test_a_range_answers_206_with_exactly_those_bytes(
    client: FlaskClient, run_id: str, artifact: Path, header: str, start: int, end: int
) -> None:
    response = client.get(f"/runs/{run_id}/artifact/model.safetensors", headers={"Range": header})
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(MODEL_BYTES)}"
    assert response.get_data() == MODEL_BYTES[start : end + 1]
    assert response.headers["Content-Length"] == str(end - start + 1)


def test_an_unsatisfiable_range_is_416_in_the_envelope(
    client: FlaskClient, run_id: str, artifact: Path
) -> None:
    response = client.get(f"/runs/{run_id}/artifact/model.safetensors", headers={"Range": "bytes=5000-6000"})
    body = assert_envelope(response, 416, "BAD_REQUEST")
    assert body["message"] == "the requested range is outside the file"
    assert response.headers["Content-Range"] == f"bytes */{len(MODEL_BYTES)}"


def test_a_repeat_download_with_the_etag_is_304(client: FlaskClient, run_id: str, artifact: Path) -> None:
    first = client.get(f"/runs/{run_id}/artifact/config.json")
    etag = first.headers["ETag"]
    again = client.get(f"/runs/{run_id}/artifact/config.json", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.get_data() == b""


def test_downloads_work_with_a_relative_artifacts_root(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flask reads a relative folder against the package's own; the API must hand it an absolute one.
    monkeypatch.chdir(tmp_path)
    relative = replace(settings, artifacts_root="relative-artifacts")
    app, _ = app_with(relative)
    client = app.test_client()
    run_id = json_of(submit(client, valid_body()))["run_id"]
    assert isinstance(run_id, str)
    folder = model_dir(relative, run_id)
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG_TEXT)
    (folder / "manifest.json").write_bytes(MANIFEST_TEXT)
    assert client.get(f"/runs/{run_id}/artifact/config.json").get_data() == CONFIG_TEXT


# ------------------------------------------------------------------------------- names never served


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "..%2F..%2Fsecret.txt",
        "%2E%2E",
        "nested",
        "nested%2Finner.txt",
        "escape.txt",
        "alias.json",
        ".manifest.json.tmp",
        "last.ckpt",
        "missing.bin",
        "config.json%00",
        "..%5Csecret.txt",
    ],
)
def test_names_outside_the_folder_or_not_plain_files_are_404(
    client: FlaskClient, run_id: str, artifact: Path, name: str
) -> None:
    response = client.get(f"/runs/{run_id}/artifact/{name}")
    assert_envelope(response, 404, "NOT_FOUND")
    assert b"not yours" not in response.get_data()


@pytest.mark.parametrize(
    "path",
    [
        "/runs/{run_id}/artifact/../../../secret.txt",
        "/runs/{run_id}/artifact/nested/inner.txt",
        "/runs/{run_id}/artifact//etc/passwd",
        "/runs/{run_id}/artifact/%2Fetc%2Fpasswd",
        "/runs/{run_id}/artifact/" + "{tmp}/secret.txt",
        "/runs/{run_id}/artifact/../../../runs/{run_id}/checkpoints/last.ckpt",
    ],
)
def test_paths_that_lead_out_of_the_folder_are_404(
    client: FlaskClient, run_id: str, artifact: Path, tmp_path: Path, path: str
) -> None:
    response = client.get(path.format(run_id=run_id, tmp=tmp_path))
    assert_envelope(response, 404, "NOT_FOUND")
    assert b"not yours" not in response.get_data()
    assert b"checkpoint" not in response.get_data()


def test_another_runs_id_cannot_reach_outside_its_own_folder(
    client: FlaskClient, run_id: str, artifact: Path
) -> None:
    assert_envelope(client.get("/runs/../artifact"), 404, "NOT_FOUND")
    assert_envelope(client.get("/runs/%2E%2E/artifact/secret.txt"), 404, "NOT_FOUND")


def test_a_symlinked_file_is_neither_listed_nor_served_even_inside(
    client: FlaskClient, run_id: str, artifact: Path
) -> None:
    assert os.path.islink(artifact / "alias.json")
    listed = json_of(client.get(f"/runs/{run_id}/artifact"))["files"]
    assert isinstance(listed, list)
    assert "alias.json" not in {item["name"] for item in listed}
    assert_envelope(client.get(f"/runs/{run_id}/artifact/alias.json"), 404, "NOT_FOUND")


def test_artifacts_need_the_api_key(settings: Settings, redis_client: redis.Redis) -> None:
    app, _ = app_with(replace(settings, api_key="k3y"))
    client = app.test_client()
    assert_envelope(client.get("/runs/x/artifact"), 401, "UNAUTHORIZED")
    assert_envelope(client.get("/runs/x/artifact/config.json"), 401, "UNAUTHORIZED")


def test_openapi_documents_the_artifact_routes(client: FlaskClient) -> None:
    paths = json_of(client.get("/openapi.json"))["paths"]
    assert isinstance(paths, dict)
    assert {"200", "404"} <= set(paths["/runs/{run_id}/artifact"]["get"]["responses"])
    download = paths["/runs/{run_id}/artifact/{name}"]["get"]["responses"]
    assert {"200", "206", "404", "416"} <= set(download)
    assert download["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"


# ---------------------------------------------------------------------------- on an object store


@pytest.fixture
def s3_client(settings: Settings, s3_bucket: str, redis_client: redis.Redis) -> FlaskClient:
    app, _ = app_with(replace(settings, artifacts_root=f"{s3_bucket}/artifacts"))
    return app.test_client()


@pytest.fixture
def s3_run(s3_client: FlaskClient, s3_bucket: str) -> str:
    """A run whose folder the worker has uploaded, manifest last."""
    run_id = json_of(submit(s3_client, valid_body()))["run_id"]
    assert isinstance(run_id, str)
    storage = Storage(f"{s3_bucket}/artifacts")
    storage.write_bytes(f"models/{run_id}/model.safetensors", MODEL_BYTES)
    storage.write_bytes(f"models/{run_id}/config.json", CONFIG_TEXT)
    storage.write_bytes(f"models/{run_id}/nested/inner.txt", b"inside a subfolder")
    storage.write_bytes(f"models/{run_id}/manifest.json", MANIFEST_TEXT)
    return run_id


def test_an_object_store_folder_is_listed_and_streamed_with_ranges(
    s3_client: FlaskClient, s3_run: str
) -> None:
    assert json_of(s3_client.get(f"/runs/{s3_run}/artifact"))["files"] == [
        {"name": "config.json", "bytes": len(CONFIG_TEXT)},
        {"name": "manifest.json", "bytes": len(MANIFEST_TEXT)},
        {"name": "model.safetensors", "bytes": len(MODEL_BYTES)},
    ]
    whole = s3_client.get(f"/runs/{s3_run}/artifact/model.safetensors")
    assert whole.status_code == 200
    assert whole.get_data() == MODEL_BYTES
    assert whole.headers["Content-Length"] == str(len(MODEL_BYTES))
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Disposition"] == "attachment; filename=model.safetensors"
    part = s3_client.get(f"/runs/{s3_run}/artifact/model.safetensors", headers={"Range": "bytes=1000-"})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 1000-1023/{len(MODEL_BYTES)}"
    assert part.get_data() == MODEL_BYTES[1000:]
    assert s3_client.get(f"/runs/{s3_run}/artifact/config.json").mimetype == "application/json"
    etag = whole.headers["ETag"]
    assert (
        s3_client.get(
            f"/runs/{s3_run}/artifact/model.safetensors", headers={"If-None-Match": etag}
        ).status_code
        == 304
    )
    outside = s3_client.get(f"/runs/{s3_run}/artifact/model.safetensors", headers={"Range": "bytes=9000-"})
    assert_envelope(outside, 416, "BAD_REQUEST")
    for name in ("nested", "nested%2Finner.txt", "missing.bin"):
        assert_envelope(s3_client.get(f"/runs/{s3_run}/artifact/{name}"), 404, "NOT_FOUND")


def test_several_ranges_or_other_units_get_the_whole_file(s3_client: FlaskClient, s3_run: str) -> None:
    for header in ("bytes=0-1, 5-6", "pages=1-2"):
        response = s3_client.get(f"/runs/{s3_run}/artifact/config.json", headers={"Range": header})
        assert (response.status_code, response.get_data()) == (200, CONFIG_TEXT)


def test_an_object_store_folder_without_its_manifest_is_not_there_yet(
    s3_client: FlaskClient, s3_run: str, s3_bucket: str
) -> None:
    Storage(f"{s3_bucket}/artifacts").remove(f"models/{s3_run}/manifest.json")
    assert_envelope(s3_client.get(f"/runs/{s3_run}/artifact"), 404, "NOT_FOUND")
    assert_envelope(s3_client.get(f"/runs/{s3_run}/artifact/config.json"), 404, "NOT_FOUND")


def test_a_store_that_does_not_answer_is_503(
    settings: Settings, redis_client: redis.Redis, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    app, _ = app_with(replace(settings, artifacts_root="s3://away/artifacts", store_timeout_s=1))
    client = app.test_client()
    run_id = json_of(submit(client, valid_body()))["run_id"]
    body = assert_envelope(client.get(f"/runs/{run_id}/artifact"), 503, "SERVICE_UNAVAILABLE")
    assert "away" not in str(body["message"])  # where the store is goes to the API log, not to callers
    assert_envelope(client.get(f"/runs/{run_id}/artifact/config.json"), 503, "SERVICE_UNAVAILABLE")


def test_credentials_the_store_refuses_make_artifact_reads_503(
    settings: Settings, redis_client: redis.Redis, wrong_credentials: str
) -> None:
    app, _ = app_with(replace(settings, artifacts_root="s3://refused/artifacts", store_timeout_s=2))
    client = app.test_client()
    run_id = json_of(submit(client, valid_body()))["run_id"]
    for path in ("artifact", "artifact/config.json", "model.zip"):
        body = assert_envelope(client.get(f"/runs/{run_id}/{path}"), 503, "SERVICE_UNAVAILABLE")
        assert wrong_credentials not in str(body["message"])


def test_a_store_that_fails_after_listing_is_503_not_a_cut_download(
    s3_client: FlaskClient, s3_run: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first bytes are read before the answer starts: a store lost between the look and the read
    is a clean 503."""
    real_chunks = Storage.chunks

    def store_goes_away(
        storage: Storage, key: str, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        yield from real_chunks(Storage(storage.root, timeout_s=1), key, start, length)

    monkeypatch.setattr(Storage, "chunks", store_goes_away)
    response = s3_client.get(f"/runs/{s3_run}/artifact/model.safetensors")
    assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
