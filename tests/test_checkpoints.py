"""trainer_tasks.checkpoints: checkpoints reach the store from a thread of their own."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from scripts.devstack import free_port
from trainer_store.storage import Storage
from trainer_tasks.checkpoints import CheckpointSync, CheckpointUploader
from trainer_tasks.errors import LeaseLost


class HeldUploads:
    """The store's uploads wait until released: an upload under way, for as long as a test needs."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.keys: list[str] = []
        real = storage.upload

        def upload(source: Path, key: str) -> None:
            self.started.set()
            self.release.wait(30)
            real(source, key)
            self.keys.append(key)

        monkeypatch.setattr(storage, "upload", upload)


@pytest.fixture
def runs(s3_bucket: str) -> Storage:
    return Storage(f"{s3_bucket}/runs")


def checkpoint(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def test_the_newest_save_of_each_file_is_uploaded(
    runs: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldUploads(runs, monkeypatch)
    uploader = CheckpointUploader(runs, "r1/checkpoints")
    uploader.submit(checkpoint(tmp_path / "a", "best.ckpt", b"best"))
    assert held.started.wait(10)
    # While best.ckpt is on its way, last.ckpt is saved twice: only the newest goes.
    uploader.submit(checkpoint(tmp_path / "a", "last.ckpt", b"first"))
    uploader.submit(checkpoint(tmp_path / "b", "last.ckpt", b"second"))
    held.release.set()
    assert uploader.close()
    assert held.keys == ["r1/checkpoints/best.ckpt", "r1/checkpoints/last.ckpt"]
    assert runs.read_bytes("r1/checkpoints/last.ckpt") == b"second"


def test_a_store_that_fails_costs_that_upload_and_training_goes_on(
    tmp_path: Path, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    uploader = CheckpointUploader(Storage("s3://away/runs", timeout_s=1), "r1/checkpoints")
    with caplog.at_level(logging.WARNING, logger="trainer_tasks.checkpoints"):
        uploader.submit(checkpoint(tmp_path, "last.ckpt", b"x"))
        uploader.submit(tmp_path / "vanished.ckpt")  # a local file gone before its upload
        assert uploader.close()
    assert uploader.failures == 2
    assert "checkpoint last.ckpt not uploaded: the object store s3://away/runs" in caplog.text


def save_two_then_lose_the_lease(runs: Storage, workspace: Path, held: HeldUploads) -> None:
    with CheckpointSync(runs, "r1", workspace) as sync:
        plugin = sync.plugin
        assert plugin is not None
        plugin.save_checkpoint({"global_step": 1}, sync.folder / "best.ckpt")
        assert held.started.wait(10)
        plugin.save_checkpoint({"global_step": 1}, sync.folder / "last.ckpt")  # waits behind best.ckpt
        threading.Timer(0.5, held.release.set).start()
        raise LeaseLost("taken over")


def test_a_lost_lease_sends_nothing_more(
    runs: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldUploads(runs, monkeypatch)
    with pytest.raises(LeaseLost):
        save_two_then_lose_the_lease(runs, tmp_path, held)
    # The upload under way finished; the one waiting was dropped: the new executor writes last.ckpt now.
    assert held.keys == ["r1/checkpoints/best.ckpt"]
    assert not runs.exists("r1/checkpoints/last.ckpt")


def test_leaving_waits_for_the_uploads_no_longer_than_its_timeout(
    runs: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    held = HeldUploads(runs, monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="trainer_tasks.checkpoints"),
        CheckpointSync(runs, "r1", tmp_path, flush_timeout_s=0.2) as sync,
    ):
        plugin = sync.plugin
        assert plugin is not None
        plugin.save_checkpoint({"global_step": 1}, sync.folder / "last.ckpt")
        assert held.started.wait(10)
    assert "checkpoints still uploading after" in caplog.text
    held.release.set()  # the upload finishes on its own, after the run has gone on
    deadline = time.monotonic() + 30
    while not held.keys and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runs.read_bytes("r1/checkpoints/last.ckpt")


def test_a_local_root_is_written_in_place(tmp_path: Path) -> None:
    with CheckpointSync(Storage(str(tmp_path / "runs")), "r1", tmp_path / "work") as sync:
        assert sync.folder == tmp_path / "runs" / "r1" / "checkpoints"
        assert sync.plugin is None  # Lightning's own checkpoint IO: nothing to upload
