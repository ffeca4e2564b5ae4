"""Corpus uploads through the test client: counts, storage, limits, errors, listing, delete, use in runs."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from scripts.devstack import free_port
from tests.conftest import DispatchRecorder
from tests.test_api import (
    SNOWFLAKE,
    app_with,
    assert_envelope,
    field_errors,
    json_of,
    no_run_recorded,
    stored_request,
    submit,
)
from trainer_api import create_app
from trainer_api.corpora import CHUNK_BYTES, store_upload
from trainer_store.corpora import UPLOADS_FOLDER, CorpusRecord, CorpusStore
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_store.storage import Storage

EXACTLY_ONE = ["give exactly one of corpus_id and corpus_path"]


def upload(
    client: FlaskClient, content: bytes, filename: str = "book.txt", headers: dict[str, str] | None = None
) -> TestResponse:
    return client.post(
        "/corpora",
        data={"file": (io.BytesIO(content), filename)},
        content_type="multipart/form-data",
        headers=headers or {},
    )


def uploaded_id(client: FlaskClient, content: bytes = b"the cat sat\non the mat\n") -> str:
    response = upload(client, content)
    assert response.status_code == 201, response.get_data(as_text=True)
    corpus_id = json_of(response)["corpus_id"]
    assert isinstance(corpus_id, str)
    return corpus_id


def uploads(corpus_root: Path) -> list[str]:
    folder = corpus_root / UPLOADS_FOLDER
    return sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- upload


def test_upload_answers_201_and_stores_the_exact_bytes(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    content = "one\ntwo\r\nthrée".encode()
    response = upload(client, content, filename="poems.txt")
    assert response.status_code == 201
    body = json_of(response)
    corpus_id = body["corpus_id"]
    assert isinstance(corpus_id, str)
    assert body == {"corpus_id": corpus_id, "name": "poems.txt", "bytes": 15, "lines": 3}
    stored = corpus_root / UPLOADS_FOLDER / f"{corpus_id}.txt"
    assert stored.read_bytes() == content
    # Only the final file is left: the temporary name was renamed away.
    assert uploads(corpus_root) == [f"{corpus_id}.txt"]
    record = CorpusStore(redis_client).get(corpus_id)
    assert record is not None
    assert record.path == f"uploads/{corpus_id}.txt"  # a key under the corpus root, not a local path
    assert (record.name, record.bytes, record.lines) == ("poems.txt", 15, 3)


@pytest.mark.parametrize(
    ("content", "lines"),
    [
        (b"a", 1),
        (b"a\n", 1),
        (b"\n", 1),
        (b"a\nb", 2),
        (b"a\n\n", 2),
        (b"a\r\nb\r\n", 2),
        (b" ", 1),
        ("caf\u00e9 \u4e2d\u6587 \U0001f600\n".encode(), 1),
    ],
)
def test_lines_and_bytes_are_counted_exactly(client: FlaskClient, content: bytes, lines: int) -> None:
    body = json_of(upload(client, content))
    assert body["bytes"] == len(content)
    assert body["lines"] == lines


def test_multibyte_characters_split_across_chunks_are_valid(client: FlaskClient, corpus_root: Path) -> None:
    # One ASCII byte first puts every chunk boundary inside a two-byte character.
    content = b"a" + "\u00e9".encode() * CHUNK_BYTES + b"\nend"
    body = json_of(upload(client, content))
    assert body["bytes"] == len(content) == 2 * CHUNK_BYTES + 5
    assert body["lines"] == 2
    assert (corpus_root / UPLOADS_FOLDER / f"{body['corpus_id']}.txt").read_bytes() == content


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        # Quoted-string escapes: the server reads C:\Users\me\notes.txt, as old browsers sent it.
        ("C:\\\\Users\\\\me\\\\notes.txt", "notes.txt"),
        ("../../etc/passwd", "passwd"),
        ("x" * 300 + ".txt", "x" * 255),
    ],
)
def test_the_name_is_the_uploads_base_name_and_never_a_path(
    client: FlaskClient, corpus_root: Path, filename: str, name: str
) -> None:
    body = json_of(upload(client, b"text\n", filename=filename))
    assert body["name"] == name
    assert uploads(corpus_root) == [f"{body['corpus_id']}.txt"]


def test_an_upload_without_a_file_name_is_named_by_its_id(client: FlaskClient) -> None:
    body = json_of(upload(client, b"text\n", filename="/"))
    assert body["name"] == f"{body['corpus_id']}.txt"


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00a",
        "caf\u00e9".encode("latin-1"),
        b"complete line\n\xc3",
        b"ok\n\xed\xa0\x80 surrogate\n",
    ],
)
def test_non_utf8_files_are_422_and_leave_nothing(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path, content: bytes
) -> None:
    assert field_errors(upload(client, content)) == {"file": ["must be UTF-8 text"]}
    assert uploads(corpus_root) == []
    assert CorpusStore(redis_client).list() == []


def test_an_empty_file_is_422(client: FlaskClient, redis_client: redis.Redis, corpus_root: Path) -> None:
    assert field_errors(upload(client, b"")) == {"file": ["must not be empty"]}
    assert uploads(corpus_root) == []
    assert CorpusStore(redis_client).list() == []


def test_a_missing_file_field_is_422(client: FlaskClient, redis_client: redis.Redis) -> None:
    missing = {"file": ["Missing data for required field."]}
    other_field = client.post(
        "/corpora", data={"other": (io.BytesIO(b"x"), "x.txt")}, content_type="multipart/form-data"
    )
    assert field_errors(other_field) == missing
    # A plain form field named "file" carries no file.
    as_text = client.post("/corpora", data={"file": "just text"}, content_type="multipart/form-data")
    assert field_errors(as_text) == missing
    assert field_errors(client.post("/corpora")) == missing
    assert CorpusStore(redis_client).list() == []


# ------------------------------------------------------------------------------------------- limits


@pytest.fixture
def small_uploads(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    app, _ = app_with(replace(settings, max_corpus_bytes=1000))
    return app.test_client()


def test_a_file_at_the_corpus_limit_is_accepted(small_uploads: FlaskClient) -> None:
    assert json_of(upload(small_uploads, b"x" * 1000))["bytes"] == 1000


def test_a_file_one_byte_over_the_corpus_limit_is_413(small_uploads: FlaskClient, corpus_root: Path) -> None:
    body = assert_envelope(upload(small_uploads, b"x" * 1001), 413, "PAYLOAD_TOO_LARGE")
    assert body["message"] == "the corpus is larger than the limit of 1000 bytes"
    assert uploads(corpus_root) == []


def test_a_body_far_over_the_corpus_limit_is_413_before_it_is_read(
    small_uploads: FlaskClient, corpus_root: Path, redis_client: redis.Redis
) -> None:
    body = assert_envelope(upload(small_uploads, b"x" * 200_000), 413, "PAYLOAD_TOO_LARGE")
    assert body["message"] == "request body too large"
    assert uploads(corpus_root) == []
    assert CorpusStore(redis_client).list() == []


def test_the_corpus_limit_does_not_apply_to_json_bodies(
    small_uploads: FlaskClient, corpus_root: Path
) -> None:
    body: dict[str, object] = {"corpus_path": "./" * 600 + "notes.txt", "user_id": 1}
    assert len(json.dumps(body)) > 1000
    assert submit(small_uploads, body).status_code == 202


def test_the_json_limit_does_not_apply_to_uploads(
    settings: Settings, redis_client: redis.Redis, corpus_root: Path
) -> None:
    app, dispatched = app_with(replace(settings, max_body_bytes=256))
    client = app.test_client()
    assert json_of(upload(client, b"y" * 10_000))["bytes"] == 10_000
    over = submit(client, {"corpus_path": "x" * 300, "user_id": 1})
    assert_envelope(over, 413, "PAYLOAD_TOO_LARGE")
    assert no_run_recorded(redis_client, dispatched)


def test_max_corpus_bytes_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis, corpus_root: Path
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("APP__CORPUS_ROOT", str(corpus_root))
    monkeypatch.setenv("APP__MAX_CORPUS_BYTES", "10")
    client = create_app(dispatch=DispatchRecorder()).test_client()
    assert upload(client, b"0123456789").status_code == 201
    assert_envelope(upload(client, b"0123456789A"), 413, "PAYLOAD_TOO_LARGE")


# ----------------------------------------------------------------------------------------- media types


@pytest.mark.parametrize(
    ("data", "content_type"), [("plain text", "text/plain"), ('{"file": "x"}', "application/json")]
)
def test_uploads_must_be_multipart(client: FlaskClient, data: str, content_type: str) -> None:
    response = client.post("/corpora", data=data, content_type=content_type)
    body = assert_envelope(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert body["message"] == "the body must be multipart/form-data"


def test_multipart_is_refused_on_json_routes(client: FlaskClient, dispatched: DispatchRecorder) -> None:
    response = client.post(
        "/runs/train",
        data={"corpus_path": "notes.txt", "user_id": "1", "file": (io.BytesIO(b"x"), "x.txt")},
        content_type="multipart/form-data",
    )
    body = assert_envelope(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert body["message"] == "the body must be JSON (Content-Type: application/json)"
    assert not dispatched.calls


# ----------------------------------------------------------------------------------- list and delete


def test_list_is_empty_at_first(client: FlaskClient) -> None:
    assert json_of(client.get("/corpora")) == {"corpora": []}


def test_list_answers_every_corpus_newest_first(client: FlaskClient) -> None:
    first = uploaded_id(client, b"first\n")
    second = uploaded_id(client, b"second\nline\n")
    listed = json_of(client.get("/corpora"))["corpora"]
    assert isinstance(listed, list)
    assert [item["corpus_id"] for item in listed] == [second, first]
    newest = listed[0]
    assert set(newest) == {"corpus_id", "name", "bytes", "lines", "created_at"}
    assert (newest["name"], newest["bytes"], newest["lines"]) == ("book.txt", 12, 2)
    assert newest["created_at"] >= listed[1]["created_at"]


def test_delete_removes_the_record_and_the_file(client: FlaskClient, corpus_root: Path) -> None:
    corpus_id = uploaded_id(client)
    kept = uploaded_id(client)
    response = client.delete(f"/corpora/{corpus_id}")
    assert response.status_code == 204
    assert response.get_data() == b""
    assert uploads(corpus_root) == [f"{kept}.txt"]
    listed = json_of(client.get("/corpora"))["corpora"]
    assert isinstance(listed, list)
    assert [item["corpus_id"] for item in listed] == [kept]
    again = assert_envelope(client.delete(f"/corpora/{corpus_id}"), 404, "NOT_FOUND")
    assert again["message"] == f"no corpus {corpus_id!r}"


def test_delete_of_a_corpus_whose_file_has_gone(client: FlaskClient, corpus_root: Path) -> None:
    corpus_id = uploaded_id(client)
    (corpus_root / UPLOADS_FOLDER / f"{corpus_id}.txt").unlink()
    assert client.delete(f"/corpora/{corpus_id}").status_code == 204
    assert json_of(client.get("/corpora")) == {"corpora": []}


def test_delete_of_an_unknown_corpus_is_404(client: FlaskClient) -> None:
    body = assert_envelope(client.delete("/corpora/nope"), 404, "NOT_FOUND")
    assert body["message"] == "no corpus 'nope'"


# ---------------------------------------------------------------------------------- storage failures


@pytest.fixture
def unreachable(settings: Settings) -> Settings:
    return replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")


def test_upload_with_redis_down_is_503_and_leaves_no_file(unreachable: Settings, corpus_root: Path) -> None:
    client = create_app(unreachable, dispatch=DispatchRecorder()).test_client()
    assert_envelope(upload(client, b"text\n"), 503, "SERVICE_UNAVAILABLE")
    assert uploads(corpus_root) == []


class BrokenStream(io.BytesIO):
    """A client that goes away after the first chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError("connection reset")
        return b"partial text\n"


def test_a_copy_that_fails_midway_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(OSError, match="connection reset"):
        store_upload(BrokenStream(), storage, "uploads/abc.txt", limit=1000)
    assert not (tmp_path / "root").exists()


@pytest.fixture
def s3_corpora(settings: Settings, s3_bucket: str, redis_client: redis.Redis) -> tuple[FlaskClient, Storage]:
    """The API with its corpus root in an object store."""
    app, _ = app_with(replace(settings, corpus_root=f"{s3_bucket}/corpora"))
    return app.test_client(), Storage(f"{s3_bucket}/corpora")


def test_an_upload_to_an_object_store_is_used_and_deleted_there(
    s3_corpora: tuple[FlaskClient, Storage], redis_client: redis.Redis
) -> None:
    client, storage = s3_corpora
    corpus_id = uploaded_id(client, b"the cat sat\n")
    assert storage.read_bytes(f"uploads/{corpus_id}.txt") == b"the cat sat\n"
    response = submit(client, {"corpus_id": corpus_id, "user_id": SNOWFLAKE})
    run_id = str(json_of(response)["run_id"])
    assert stored_request(redis_client, run_id)["corpus_path"] == f"uploads/{corpus_id}.txt"
    # A queued run still needs the file; once it has ended the corpus goes, from the store too.
    assert client.delete(f"/corpora/{corpus_id}").status_code == 409
    assert storage.exists(f"uploads/{corpus_id}.txt")
    store = RunStore(redis_client)
    assert store.claim(run_id, "worker", 60, time.time())
    assert store.finish(run_id, "completed", "completed", time.time())
    assert client.delete(f"/corpora/{corpus_id}").status_code == 204
    assert not storage.exists(f"uploads/{corpus_id}.txt")


def test_an_upload_the_store_refuses_is_503_and_leaves_no_record(
    settings: Settings, redis_client: redis.Redis, s3_env: dict[str, str]
) -> None:
    app, _ = app_with(replace(settings, corpus_root="s3://no-such-bucket-here/corpora"))
    client = app.test_client()
    assert_envelope(upload(client, b"text\n"), 503, "SERVICE_UNAVAILABLE")
    assert CorpusStore(redis_client).list() == []


def test_an_upload_with_credentials_the_store_refuses_is_503_and_leaves_no_record(
    settings: Settings, redis_client: redis.Redis, wrong_credentials: str
) -> None:
    app, _ = app_with(replace(settings, corpus_root="s3://refused/corpora", store_timeout_s=2))
    body = assert_envelope(upload(app.test_client(), b"text\n"), 503, "SERVICE_UNAVAILABLE")
    assert wrong_credentials not in str(body["message"])  # where the store is goes to the log only
    assert CorpusStore(redis_client).list() == []


def test_a_record_that_cannot_be_written_takes_the_stored_file_with_it(
    settings: Settings, s3_bucket: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_s3 = replace(
        settings, corpus_root=f"{s3_bucket}/corpora", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    client = create_app(on_s3, dispatch=DispatchRecorder()).test_client()
    assert_envelope(upload(client, b"text\n"), 503, "SERVICE_UNAVAILABLE")
    assert Storage(f"{s3_bucket}/corpora").files("uploads") == []


def test_a_record_from_before_keys_still_names_its_file_on_a_local_root(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path
) -> None:
    """Records written when a corpus's path was the API machine's absolute path keep working."""
    (corpus_root / UPLOADS_FOLDER).mkdir()
    legacy = corpus_root / UPLOADS_FOLDER / "old.txt"
    legacy.write_text("older text\n")
    CorpusStore(redis_client).add(
        CorpusRecord(corpus_id="old", name="old.txt", bytes=11, lines=1, created_at=1.0, path=str(legacy))
    )
    response = submit(client, {"corpus_id": "old", "user_id": SNOWFLAKE})
    run_id = str(json_of(response)["run_id"])
    assert stored_request(redis_client, run_id)["corpus_path"] == "uploads/old.txt"
    store = RunStore(redis_client)
    assert store.claim(run_id, "worker", 60, time.time())
    assert store.finish(run_id, "completed", "completed", time.time())
    assert client.delete("/corpora/old").status_code == 204
    assert not legacy.exists()


# ------------------------------------------------------------------------------ naming a corpus in runs


def test_a_run_on_an_uploaded_corpus_stores_its_id_and_resolved_file(
    client: FlaskClient, redis_client: redis.Redis, corpus_root: Path, dispatched: DispatchRecorder
) -> None:
    corpus_id = uploaded_id(client)
    response = submit(client, {"corpus_id": corpus_id, "user_id": SNOWFLAKE})
    assert response.status_code == 202
    stored = stored_request(redis_client, json_of(response)["run_id"])
    assert stored["corpus_id"] == corpus_id
    assert stored["corpus_path"] == f"uploads/{corpus_id}.txt"
    assert len(dispatched.sent) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": 1},
        {"user_id": 1, "corpus_path": "notes.txt", "corpus_id": "abc"},
        {"user_id": 1, "corpus_path": "missing.txt", "corpus_id": "abc"},
    ],
)
def test_a_run_names_exactly_one_corpus(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder, body: dict[str, object]
) -> None:
    assert field_errors(submit(client, body)) == {"corpus_id": EXACTLY_ONE, "corpus_path": EXACTLY_ONE}
    assert no_run_recorded(redis_client, dispatched)


def test_both_corpus_fields_and_another_problem_are_reported_together(client: FlaskClient) -> None:
    body = {"user_id": -1, "corpus_path": "notes.txt", "corpus_id": "abc"}
    assert set(field_errors(submit(client, body))) == {"user_id", "corpus_id", "corpus_path"}


def test_an_empty_corpus_id_is_422_naming_only_it(client: FlaskClient) -> None:
    assert set(field_errors(submit(client, {"user_id": 1, "corpus_id": ""}))) == {"corpus_id"}


def test_an_unknown_corpus_id_is_422(
    client: FlaskClient, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    response = submit(client, {"corpus_id": "nope", "user_id": 1})
    assert field_errors(response) == {"corpus_id": ["unknown corpus 'nope'"]}
    assert no_run_recorded(redis_client, dispatched)


def test_a_deleted_or_vanished_corpus_is_unknown(client: FlaskClient, corpus_root: Path) -> None:
    deleted = uploaded_id(client)
    assert client.delete(f"/corpora/{deleted}").status_code == 204
    assert set(field_errors(submit(client, {"corpus_id": deleted, "user_id": 1}))) == {"corpus_id"}
    vanished = uploaded_id(client)
    (corpus_root / UPLOADS_FOLDER / f"{vanished}.txt").unlink()
    assert set(field_errors(submit(client, {"corpus_id": vanished, "user_id": 1}))) == {"corpus_id"}


# -------------------------------------------------------------------------------------- docs and keys


def test_openapi_documents_the_upload_as_multipart(client: FlaskClient) -> None:
    paths = json_of(client.get("/openapi.json"))["paths"]
    assert isinstance(paths, dict)
    post = paths["/corpora"]["post"]
    assert post["requestBody"]["content"]["multipart/form-data"]["schema"] == {
        "$ref": "#/components/schemas/CorpusUpload"
    }
    components = json_of(client.get("/openapi.json"))["components"]
    assert isinstance(components, dict)
    upload_schema = components["schemas"]["CorpusUpload"]
    assert upload_schema["properties"]["file"]["format"] == "binary"
    assert upload_schema["required"] == ["file"]
    assert {"201", "413", "422"} <= set(post["responses"])
    assert "get" in paths["/corpora"]
    assert "delete" in paths["/corpora/{corpus_id}"]


def test_corpora_need_the_api_key(settings: Settings, redis_client: redis.Redis) -> None:
    app, _ = app_with(replace(settings, api_key="k3y"))
    client = app.test_client()
    assert_envelope(upload(client, b"text\n"), 401, "UNAUTHORIZED")
    assert_envelope(client.get("/corpora"), 401, "UNAUTHORIZED")
    assert upload(client, b"text\n", headers={"X-Api-Key": "k3y"}).status_code == 201
