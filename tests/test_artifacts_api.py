"""A run's artifact folder through the test client: listing, downloads with Range, what is never served."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from schemas.settings import Settings
from tests.test_api import app_with, assert_envelope, json_of, submit, valid_body

MODEL_BYTES = bytes(range(256)) * 4
CONFIG_TEXT = b'{"model_type": "gpt2", "n_layer": 2}\n'


@pytest.fixture
def run_id(client: FlaskClient) -> str:
    accepted = json_of(submit(client, valid_body()))["run_id"]
    assert isinstance(accepted, str)
    return accepted


@pytest.fixture
def artifact(settings: Settings, run_id: str, tmp_path: Path) -> Path:
    """The folder the worker writes, with things beside it and in it that must never be served."""
    folder = settings.model_dir(run_id)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(MODEL_BYTES)
    (folder / "config.json").write_bytes(CONFIG_TEXT)
    (folder / "metrics.csv").write_bytes(b"")
    (folder / "nested").mkdir()
    (folder / "nested" / "inner.txt").write_text("inside a subfolder\n")
    (folder / ".manifest.json.tmp").write_text("{half written")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    (folder / "escape.txt").symlink_to(secret)
    (folder / "alias.json").symlink_to(folder / "config.json")
    checkpoints = settings.run_dir(run_id) / "checkpoints"
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
    settings.model_dir(run_id).parent.mkdir(parents=True)
    settings.model_dir(run_id).write_text("not a folder")
    assert_envelope(client.get(f"/runs/{run_id}/artifact"), 404, "NOT_FOUND")


def test_an_empty_folder_lists_no_files(client: FlaskClient, settings: Settings, run_id: str) -> None:
    settings.model_dir(run_id).mkdir(parents=True)
    assert json_of(client.get(f"/runs/{run_id}/artifact")) == {"run_id": run_id, "files": []}


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
    relative = replace(settings, artifacts_root=Path("relative-artifacts"))
    app, _ = app_with(relative)
    client = app.test_client()
    run_id = json_of(submit(client, valid_body()))["run_id"]
    assert isinstance(run_id, str)
    folder = relative.model_dir(run_id)
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG_TEXT)
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
