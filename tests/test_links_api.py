"""Signed links, the model as one zip, and training a run again: through the real app's test client."""

from __future__ import annotations

import io
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from flask.testing import FlaskClient

from tests.conftest import DispatchRecorder
from tests.test_api import app_with, assert_envelope, json_of, stored_request, submit, valid_body
from trainer_api.links import signature, signed
from trainer_store.corpora import CorpusStore
from trainer_store.runs import run_key
from trainer_store.settings import Settings

KEY = {"X-Api-Key": "k3y"}
SECRET = "link-secret"
FILES = {
    "config.json": b'{"model_type": "gpt2"}\n',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.json": b"{}\n",
    "manifest.json": b'{"run": "done"}\n',
}


@pytest.fixture
def secured(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    app, _ = app_with(replace(settings, api_key="k3y", link_secret=SECRET))
    return app.test_client()


def new_run(client: FlaskClient, **overrides: object) -> str:
    run_id = json_of(submit(client, valid_body(**overrides), headers=KEY))["run_id"]
    assert isinstance(run_id, str)
    return run_id


def write_model(settings: Settings, run_id: str, manifest: bool = True) -> Path:
    folder = Path(settings.artifacts_root) / "models" / run_id
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        if name != "manifest.json" or manifest:
            (folder / name).write_bytes(data)
    return folder


def link_of(client: FlaskClient, run_id: str, **body: object) -> dict[str, object]:
    response = client.post(f"/runs/{run_id}/links", json=body, headers=KEY)
    assert response.status_code == 201, response.get_data(as_text=True)
    return json_of(response)


def test_a_signed_link_downloads_the_model_as_one_zip_without_any_header(
    secured: FlaskClient, settings: Settings
) -> None:
    run_id = new_run(secured)
    folder = write_model(settings, run_id)
    # Symlinks are never part of the zip, wherever they lead.
    (folder / "escape.txt").symlink_to(folder.parent.parent / "elsewhere.txt")
    (folder / "alias.json").symlink_to(folder / "config.json")
    (folder.parent.parent / "elsewhere.txt").write_text("not part of the model\n")
    before = int(time.time())
    links = link_of(secured, run_id)
    download, expires_at = str(links["download"]), links["expires_at"]
    assert isinstance(expires_at, int)
    assert before + 7 * 24 * 3600 <= expires_at <= int(time.time()) + 7 * 24 * 3600
    assert download.startswith(f"/runs/{run_id}/model.zip?expires={expires_at}&signature=")

    # Without the signature the key is still needed; with it, nothing else is.
    assert_envelope(secured.get(f"/runs/{run_id}/model.zip"), 401, "UNAUTHORIZED")
    response = secured.get(download)
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert response.headers["Content-Disposition"] == f'attachment; filename="model-{run_id}.zip"'
    assert response.headers["Accept-Ranges"] == "none"
    body = response.get_data()
    assert int(response.headers["Content-Length"]) == len(body)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert {info.filename: info.compress_type for info in archive.infolist()} == dict.fromkeys(
            FILES, zipfile.ZIP_STORED
        )
        assert {name: archive.read(name) for name in archive.namelist()} == FILES
    # No partial answers: a Range header gets the whole zip.
    ranged = secured.get(download, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 200
    assert ranged.get_data() == body
    # The key alone downloads it too.
    assert secured.get(f"/runs/{run_id}/model.zip", headers=KEY).get_data() == body


def test_tampered_expired_or_foreign_links_are_403(secured: FlaskClient, settings: Settings) -> None:
    run_id, other = new_run(secured), new_run(secured)
    write_model(settings, run_id)
    write_model(settings, other)
    download = str(link_of(secured, run_id, ttl_s=60)["download"])
    query = parse_qs(urlsplit(download).query)
    expires, sig = query["expires"][0], query["signature"][0]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    refused = [
        f"/runs/{run_id}/model.zip?expires={expires}&signature={flipped}",
        f"/runs/{run_id}/model.zip?expires={int(expires) + 1}&signature={sig}",
        f"/runs/{other}/model.zip?expires={expires}&signature={sig}",
        f"/runs/{run_id}/model.zip?expires=soon&signature={sig}",
        f"/runs/{run_id}/model.zip?signature={sig}",
    ]
    for path in refused:
        body = assert_envelope(secured.get(path), 403, "FORBIDDEN")
        assert body["message"] == "this link is not valid; ask for a new one"
    past = int(time.time()) - 1
    expired = signed(SECRET, f"/runs/{run_id}/model.zip", past)
    body = assert_envelope(secured.get(expired), 403, "FORBIDDEN")
    assert body["message"] == "this link has expired; ask for a new one"
    # A signature opens only the download: elsewhere the key decides.
    listing = f"/runs/{run_id}/artifact?expires={expires}&signature={sig}"
    assert_envelope(secured.get(listing), 401, "UNAUTHORIZED")


def test_links_need_the_key_a_secret_a_run_and_a_sane_lifetime(
    secured: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    run_id = new_run(secured)
    assert_envelope(secured.post(f"/runs/{run_id}/links"), 401, "UNAUTHORIZED")
    assert_envelope(secured.post("/runs/nope/links", headers=KEY), 404, "NOT_FOUND")
    for ttl in (59, 30 * 24 * 3600 + 1, "1h"):
        assert_envelope(
            secured.post(f"/runs/{run_id}/links", json={"ttl_s": ttl}, headers=KEY), 422, "VALIDATION_ERROR"
        )
    # Before the model is complete (manifest.json comes last) there is nothing to download.
    write_model(settings, run_id, manifest=False)
    download = str(link_of(secured, run_id)["download"])
    assert_envelope(secured.get(download), 404, "NOT_FOUND")
    assert_envelope(secured.get("/runs/nope/model.zip", headers=KEY), 404, "NOT_FOUND")

    unsigned, _ = app_with(replace(settings, link_secret=None))
    client = unsigned.test_client()
    body = assert_envelope(client.post(f"/runs/{run_id}/links"), 503, "SERVICE_UNAVAILABLE")
    assert "SECURITY__LINK_SECRET" in str(body["message"])
    # Without a secret no signature can be checked, so none opens anything.
    sig = signature(SECRET, f"/runs/{run_id}/model.zip", int(time.time()) + 60)
    assert_envelope(client.get(f"/runs/{run_id}/model.zip?expires=1&signature={sig}"), 403, "FORBIDDEN")


def test_retry_is_a_new_run_with_the_same_request_and_owner(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    first = json_of(submit(client, valid_body(num_epochs=3, test_fraction=0.2)))["run_id"]
    redis_client.hset(run_key(str(first)), "status", "failed")
    response = client.post(f"/runs/{first}/retry")
    assert response.status_code == 202
    again = json_of(response)
    assert again["run_id"] != first
    assert dispatched.sent[-1] == (again["run_id"], again["job_id"])
    assert stored_request(redis_client, again["run_id"]) == stored_request(redis_client, first)
    status = json_of(client.get(f"/runs/{again['run_id']}"))
    assert (status["status"], status["user_id"]) == ("queued", valid_body()["user_id"])
    assert_envelope(client.post("/runs/nope/retry"), 404, "NOT_FOUND")


def test_retry_of_a_run_whose_corpus_was_deleted_is_409(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    upload = client.post(
        "/corpora",
        data={"file": (io.BytesIO(b"the cat sat.\n" * 40), "cats.txt")},
        content_type="multipart/form-data",
    )
    corpus_id = str(json_of(upload)["corpus_id"])
    run_id = json_of(submit(client, {"corpus_id": corpus_id, "user_id": 7}))["run_id"]
    assert CorpusStore(redis_client).delete(corpus_id)
    body = assert_envelope(client.post(f"/runs/{run_id}/retry"), 409, "CONFLICT")
    assert f"corpus {corpus_id!r} has been deleted" in str(body["message"])
    assert len(dispatched.sent) == 1
