"""Storage: the same behaviour on a local folder and on an S3-protocol server; keys never lead out."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts.devstack import free_port
from trainer_store.storage import (
    S3_ATTEMPTS,
    InvalidKey,
    Storage,
    StoredFile,
    StoreUnavailable,
    answered,
    safe_key,
)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket: str = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket}/prefix")


def test_bytes_written_are_read_back_whole_and_in_ranges(storage: Storage) -> None:
    data = bytes(range(256)) * 10
    storage.write_bytes("runs/r1/file.bin", data)
    assert storage.exists("runs/r1/file.bin")
    assert storage.size("runs/r1/file.bin") == len(data)
    assert storage.read_bytes("runs/r1/file.bin") == data
    assert b"".join(storage.chunks("runs/r1/file.bin", chunk_bytes=100)) == data
    assert (
        b"".join(storage.chunks("runs/r1/file.bin", start=300, length=1000, chunk_bytes=64)) == data[300:1300]
    )
    # A length past the end stops at the end.
    assert b"".join(storage.chunks("runs/r1/file.bin", start=2500, length=500)) == data[2500:]


def test_files_lists_plain_files_directly_under_a_prefix(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes("models/r1/config.json", b"{}")
    storage.write_bytes("models/r1/weights.bin", b"x" * 10)
    storage.write_bytes("models/r1/sub/inner.txt", b"deeper")
    source = tmp_path / "local.txt"
    source.write_text("uploaded")
    storage.upload(source, "models/r1/uploaded.txt")
    local = storage.local_path("models/r1")
    if local is not None:  # a temporary file of a write under way is never listed, nor is a symlink
        (local / ".weights.bin.1234.part").write_bytes(b"half")
        (tmp_path / "elsewhere.txt").write_text("outside the store")
        (local / "escape.txt").symlink_to(tmp_path / "elsewhere.txt")
        (local / "alias.json").symlink_to(local / "config.json")
    assert storage.files("models/r1") == [
        StoredFile("config.json", 2),
        StoredFile("uploaded.txt", 8),
        StoredFile("weights.bin", 10),
    ]
    assert storage.files("models/none") == []


def test_download_copies_whole_and_a_missing_key_is_file_not_found(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes("a/b.txt", b"content")
    target = tmp_path / "cache" / "b.txt"
    storage.download("a/b.txt", target)
    assert target.read_bytes() == b"content"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]  # no partial file left behind
    with pytest.raises(FileNotFoundError):
        storage.download("a/missing.txt", tmp_path / "cache" / "missing.txt")
    assert not (tmp_path / "cache" / "missing.txt").exists()
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/missing.txt")
    with pytest.raises(FileNotFoundError):
        list(storage.chunks("a/missing.txt"))
    with pytest.raises(FileNotFoundError):
        storage.size("a/missing.txt")
    assert not storage.exists("a/missing.txt")


def test_remove_takes_a_whole_prefix_and_missing_is_fine(storage: Storage) -> None:
    storage.write_bytes("runs/r1/checkpoints/last.ckpt", b"1")
    storage.write_bytes("runs/r1/splits/validation.pt", b"2")
    storage.write_bytes("runs/r2/keep.txt", b"3")
    storage.remove("runs/r1")
    assert not storage.exists("runs/r1/checkpoints/last.ckpt")
    assert not storage.exists("runs/r1/splits/validation.pt")
    assert storage.read_bytes("runs/r2/keep.txt") == b"3"
    storage.remove("runs/r1")  # again: nothing there
    storage.remove("runs/r2/keep.txt")
    assert not storage.exists("runs/r2/keep.txt")
    storage.write_bytes("top.txt", b"4")
    storage.remove("top.txt")
    root = storage.local_path("")
    assert root is None or root.is_dir(), "the root itself is never removed with what was in it"
    assert storage.files("") == []


def test_urls_say_where_a_key_lives_for_every_process(storage: Storage, tmp_path: Path) -> None:
    if storage.is_local:
        assert storage.url("models/r1") == str(tmp_path / "root" / "models" / "r1")
        assert storage.local_path("models/r1") == tmp_path / "root" / "models" / "r1"
        assert storage.describe() == f"the file store {tmp_path / 'root'}"
    else:
        assert storage.url("models/r1") == f"{storage.root}/models/r1"
        assert storage.url("models/r1").startswith("s3://test-")
        assert storage.local_path("models/r1") is None
        assert storage.describe().startswith(f"the object store {storage.root} at http://127.0.0.1:")
    assert storage.url() == storage.url("").rstrip("/")
    storage.ping()


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../etc/passwd",
        "a/../../b",
        "/etc/passwd",
        "a//b",
        ".hidden",
        "a/.part",
        "a\\b",
        "a\x00b",
        "x" * 256,
    ],
)
def test_keys_that_could_lead_out_of_the_root_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidKey):
        safe_key(bad)
    with pytest.raises(InvalidKey):
        Storage(str(tmp_path)).write_bytes(bad or "/", b"x")


def test_safe_key_joins_validated_parts() -> None:
    assert safe_key("models", "run-1", "config.json") == "models/run-1/config.json"
    assert safe_key("books/sub dir/story one.txt") == "books/sub dir/story one.txt"


def test_a_bucket_root_must_name_a_bucket() -> None:
    with pytest.raises(ValueError, match="names a bucket"):
        Storage("s3://")


def test_an_unreachable_store_fails_fast_and_names_itself(
    monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage = Storage("s3://nowhere/prefix", timeout_s=1)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"the object store s3://nowhere/prefix at {endpoint}"):
        storage.write_bytes("a.txt", b"x")
    with pytest.raises(StoreUnavailable):
        storage.ping()
    assert time.monotonic() - began < 30


class SilentStore:
    """Takes connections and reads the requests, and never answers; counts the requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                connection, _ = self.listener.accept()
                if connection.recv(65536):
                    self.requests += 1
                self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


def test_a_silent_store_is_tried_a_bounded_number_of_times_each_for_the_timeout(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's own defaults (60 s reads, retried) would hold a run for minutes; one operation here
    takes S3_ATTEMPTS tries of at most the timeout each."""
    silent = SilentStore()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", silent.endpoint)
        storage = Storage("s3://silent/prefix", timeout_s=1)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="ReadTimeoutError"):
            storage.info("a.txt")
        elapsed = time.monotonic() - began
    finally:
        silent.close()
    assert silent.requests == S3_ATTEMPTS
    assert S3_ATTEMPTS * 1 <= elapsed < S3_ATTEMPTS * 1 + 5


def test_credentials_the_store_refuses_make_every_use_unavailable_naming_the_store(
    wrong_credentials: str,
) -> None:
    storage = Storage("s3://refused/prefix", timeout_s=2)
    named = f"the object store s3://refused/prefix at {wrong_credentials} failed: "
    uses: dict[str, Callable[[], object]] = {
        "ping": storage.ping,
        "write": lambda: storage.write_bytes("a.txt", b"x"),
        "list": lambda: storage.files("models"),
        "look": lambda: storage.exists("a.txt"),
        "read": lambda: storage.read_bytes("a.txt"),
        "stream": lambda: list(storage.chunks("a.txt")),
    }
    for use, attempt in uses.items():
        with pytest.raises(StoreUnavailable) as refused:
            attempt()
        assert str(refused.value).startswith(named), use


def test_a_missing_bucket_is_unavailable_not_empty(s3_env: dict[str, str]) -> None:
    storage = Storage("s3://no-such-bucket-here/prefix")
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        storage.ping()
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        storage.write_bytes("a.txt", b"x")
    assert storage.files("anything") == []


def test_what_the_untyped_store_answers_is_checked() -> None:
    assert answered(b"x", bytes, "a key") == b"x"
    with pytest.raises(TypeError, match="the store answered str for a key, not bytes"):
        answered("x", bytes, "a key")


def test_info_gives_the_size_and_a_version_that_changes_with_the_content(storage: Storage) -> None:
    storage.write_bytes("a/file.txt", b"first")
    first = storage.info("a/file.txt")
    assert first.size == 5
    time.sleep(0.01)  # a local version includes the change time
    storage.write_bytes("a/file.txt", b"second!")
    second = storage.info("a/file.txt")
    assert second.size == 7
    assert second.version != first.version
    assert storage.info("a/file.txt") == second
    assert storage.is_file("a/file.txt")
    assert not storage.is_file("a")
    assert not storage.is_file("a/missing.txt")
    for missing in ("a/missing.txt", "a"):
        with pytest.raises(FileNotFoundError):
            storage.info(missing)


def test_upload_folder_puts_the_named_file_last(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.json", "manifest.json", "z.bin"):
        (folder / name).write_text(name)
    uploaded: list[str] = []
    real_upload = storage.upload

    def noting(source: Path, key: str) -> None:
        real_upload(source, key)
        uploaded.append(key)

    monkeypatch.setattr(storage, "upload", noting)
    storage.upload_folder(folder, "models/r1", last="manifest.json")
    assert uploaded == ["models/r1/a.json", "models/r1/z.bin", "models/r1/manifest.json"]
    assert storage.read_bytes("models/r1/manifest.json") == b"manifest.json"
    assert [found.name for found in storage.files("models/r1")] == ["a.json", "manifest.json", "z.bin"]


def test_what_another_process_writes_is_seen_at_once(storage: Storage) -> None:
    other = Storage(storage.root)
    storage.write_bytes("models/r1/config.json", b"{}")
    assert storage.files("models/r1") == [StoredFile("config.json", 2)]
    assert not storage.exists("models/r1/manifest.json")
    other.write_bytes("models/r1/manifest.json", b"{}")
    # No listing is remembered: a file appears to every process as soon as it is written.
    assert storage.exists("models/r1/manifest.json")
    assert storage.files("models/r1") == [StoredFile("config.json", 2), StoredFile("manifest.json", 2)]


def test_ranges_that_hold_nothing_read_nothing(storage: Storage) -> None:
    storage.write_bytes("a.bin", b"0123456789")
    assert list(storage.chunks("a.bin", length=0)) == []
    assert list(storage.chunks("a.bin", start=10)) == []
    assert list(storage.chunks("a.bin", start=25, length=5)) == []


class SlowDown(BaseHTTPRequestHandler):
    """An S3 endpoint under too much load: every request is refused with 503 SlowDown, as S3 does."""

    def do_GET(self) -> None:
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads what the client makes of the answer."""


def test_a_store_that_refuses_a_read_is_unavailable(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(StoreUnavailable, match=r"HTTP 503 reading 'a\.bin'"):
            list(Storage("s3://busy/prefix", timeout_s=2).chunks("a.bin"))
    finally:
        server.shutdown()
        server.server_close()
