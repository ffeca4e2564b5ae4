"""trainer_store.cache: a worker's copies of remote files, least recently used evicted first, shared
by several processes."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer_store.cache import STALE_PART_S, FileCache
from trainer_store.storage import Storage


class Downloads:
    """Counts what the cache takes from the store (the store itself is real)."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        real = storage.download

        def download(key: str, target: Path) -> None:
            self.keys.append(key)
            real(key, target)

        monkeypatch.setattr(storage, "download", download)


@pytest.fixture
def remote(s3_bucket: str) -> Storage:
    return Storage(f"{s3_bucket}/root")


def objects(cache: FileCache) -> list[Path]:
    return sorted(path for path in (cache.root / "objects").iterdir() if not path.name.startswith("."))


def test_a_local_root_needs_no_copy(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    storage.write_bytes("corpora/a.txt", b"text")
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.workspace("run") as workspace:
        found = cache.fetch(storage, "corpora/a.txt", workspace / "a.txt")
        assert found == tmp_path / "store" / "corpora" / "a.txt"
        assert not (workspace / "a.txt").exists()
        assert cache.fetch_folder(storage, "corpora", ["a.txt"], workspace / "f") == found.parent
        with pytest.raises(FileNotFoundError):
            cache.fetch(storage, "corpora/missing.txt", workspace / "m.txt")
    assert not workspace.exists()
    assert not (tmp_path / "cache" / "objects").exists()


def test_a_remote_file_is_downloaded_once_and_linked_into_each_workspace(
    remote: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote.write_bytes("corpora/a.txt", b"the text")
    downloads = Downloads(remote, monkeypatch)
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.workspace("first") as first, cache.workspace("second") as second:
        assert cache.fetch(remote, "corpora/a.txt", first / "corpus.txt") == first / "corpus.txt"
        assert cache.fetch(remote, "corpora/a.txt", second / "corpus.txt") == second / "corpus.txt"
        assert (first / "corpus.txt").read_bytes() == (second / "corpus.txt").read_bytes() == b"the text"
        # One copy on disk: the cached file and two links to it.
        [entry] = objects(cache)
        assert entry.stat().st_nlink == 3
    assert downloads.keys == ["corpora/a.txt"]
    assert entry.stat().st_nlink == 1
    with pytest.raises(FileNotFoundError):
        cache.fetch(remote, "corpora/missing.txt", tmp_path / "cache" / "work" / "m.txt")


def test_a_changed_object_is_downloaded_again(
    remote: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote.write_bytes("a.txt", b"old")
    downloads = Downloads(remote, monkeypatch)
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.workspace("run") as workspace:
        assert cache.fetch(remote, "a.txt", workspace / "a").read_bytes() == b"old"
        remote.write_bytes("a.txt", b"new!")
        assert cache.fetch(remote, "a.txt", workspace / "b").read_bytes() == b"new!"
        assert (workspace / "a").read_bytes() == b"old"  # a copy in use is never changed under its reader
    assert downloads.keys == ["a.txt", "a.txt"]


def test_the_least_recently_used_files_go_first(remote: Storage, tmp_path: Path) -> None:
    for name in "abcd":
        remote.write_bytes(f"{name}.bin", name.encode() * 100)
    cache = FileCache(tmp_path / "cache", 250)
    with cache.workspace("run") as workspace:
        for name in "ab":
            cache.fetch(remote, f"{name}.bin", workspace / name)
            time.sleep(0.02)  # the order is the files' times
        cache.fetch(remote, "a.bin", workspace / "a-again")  # a is used again: b is now the oldest
        time.sleep(0.02)
        cache.fetch(remote, "c.bin", workspace / "c")
        assert sorted(path.stat().st_size for path in objects(cache)) == [100, 100]
        kept = {path.read_bytes()[:1] for path in objects(cache)}
        assert kept == {b"a", b"c"}
        # The evicted file's links still read whole.
        assert (workspace / "b").read_bytes() == b"b" * 100


def test_a_file_being_linked_is_not_evicted(remote: Storage, tmp_path: Path) -> None:
    for name in "ab":
        remote.write_bytes(f"{name}.bin", name.encode() * 100)
    cache = FileCache(tmp_path / "cache", 150)
    with cache.workspace("run") as workspace:
        cache.fetch(remote, "a.bin", workspace / "a")
        [entry] = objects(cache)
        handle = os.open(entry, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)  # another process in the middle of linking it
            cache.fetch(remote, "b.bin", workspace / "b")
            assert len(objects(cache)) == 2
        finally:
            os.close(handle)
        cache.fetch(remote, "b.bin", workspace / "b2")  # a hit still evicts nothing: only downloads do
        remote.write_bytes("c.bin", b"c" * 10)
        cache.fetch(remote, "c.bin", workspace / "c")
        assert sorted(path.stat().st_size for path in objects(cache)) == [10, 100]


def test_only_one_process_evicts_at_a_time(remote: Storage, tmp_path: Path) -> None:
    for name in "ab":
        remote.write_bytes(f"{name}.bin", name.encode() * 100)
    cache = FileCache(tmp_path / "cache", 150)
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / ".evict.lock", "a+b") as lock, cache.workspace("run") as workspace:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is evicting
        cache.fetch(remote, "a.bin", workspace / "a")
        cache.fetch(remote, "b.bin", workspace / "b")
        assert len(objects(cache)) == 2
        fcntl.flock(lock, fcntl.LOCK_UN)
        remote.write_bytes("c.bin", b"c" * 10)
        cache.fetch(remote, "c.bin", workspace / "c")
        assert len(objects(cache)) == 2


def test_a_download_left_behind_by_a_dead_process_is_removed(remote: Storage, tmp_path: Path) -> None:
    remote.write_bytes("a.bin", b"a")
    cache = FileCache(tmp_path / "cache", 1000)
    stale = tmp_path / "cache" / "objects" / ".dead.1234.part"
    fresh = tmp_path / "cache" / "objects" / ".busy.5678.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - STALE_PART_S - 10
    os.utime(stale, (old, old))
    with cache.workspace("run") as workspace:
        cache.fetch(remote, "a.bin", workspace / "a")
    assert not stale.exists()
    assert fresh.exists()  # may still be someone's download under way


def racing_lock(action: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """The next shared lock the cache takes runs `action` first: another process acting in between."""
    real = fcntl.flock
    done: list[bool] = []

    def flock(handle: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH and not done:
            done.append(True)
            action()
        real(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("race", ["evicted", "replaced"])
def test_an_entry_evicted_while_being_opened_is_downloaded_again(
    race: str, remote: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote.write_bytes("a.bin", b"a" * 10)
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.workspace("run") as workspace:
        cache.fetch(remote, "a.bin", workspace / "first")
        [entry] = objects(cache)
        downloads = Downloads(remote, monkeypatch)

        def evict() -> None:
            if race == "evicted":
                entry.unlink()
            else:  # another process's newer download took the name
                (tmp_path / "other").write_bytes(b"a" * 10)
                os.replace(tmp_path / "other", entry)

        racing_lock(evict, monkeypatch)
        assert cache.fetch(remote, "a.bin", workspace / "second").read_bytes() == b"a" * 10
        assert downloads.keys == ["a.bin"]


def test_fetch_folder_gathers_the_named_files(remote: Storage, tmp_path: Path) -> None:
    remote.write_bytes("models/r1/config.json", b"{}")
    remote.write_bytes("models/r1/model.bin", b"weights")
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.workspace("eval") as workspace:
        folder = cache.fetch_folder(remote, "models/r1", ["config.json", "model.bin"], workspace / "model")
        assert folder == workspace / "model"
        assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.bin"]
        assert (folder / "model.bin").read_bytes() == b"weights"


def fetch_many(root: str, cache_root: str, env: dict[str, str], seed: int, out: str) -> None:
    """One worker process: fetches every file in a random order, checking each copy it gets."""
    os.environ.update(env)
    storage = Storage(root)
    cache = FileCache(Path(cache_root), 2500)
    order = list(range(12)) * 2
    random.Random(seed).shuffle(order)
    wrong = 0
    with cache.workspace(f"p{seed}") as workspace:
        for step, index in enumerate(order):
            found = cache.fetch(storage, f"f{index}.bin", workspace / f"{step}.bin")
            wrong += found.read_bytes() != bytes([index]) * 1000
    Path(out).write_text(str(wrong))


def test_several_processes_share_one_cache(remote: Storage, tmp_path: Path, s3_env: dict[str, str]) -> None:
    for index in range(12):
        remote.write_bytes(f"f{index}.bin", bytes([index]) * 1000)
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"out-{n}" for n in range(4)]
    processes = [
        context.Process(
            target=fetch_many, args=(remote.root, str(tmp_path / "cache"), s3_env, n, str(outputs[n]))
        )
        for n in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    assert [path.read_text() for path in outputs] == ["0"] * 4
    cached = list((tmp_path / "cache" / "objects").iterdir())
    assert sum(path.stat().st_size for path in cached if not path.name.startswith(".")) <= 2500
    assert not [path for path in cached if path.name.startswith(".")]


def test_an_entry_another_process_evicted_first_counts_as_gone(tmp_path: Path) -> None:
    from trainer_store.cache import _remove_unused

    assert _remove_unused(tmp_path / "already-gone")


def test_a_name_taken_and_evicted_before_the_link_is_copied_from_the_open_file(
    remote: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between our check and our link another process's download of the same version took the name
    and was evicted: the copy we hold open is still whole."""
    remote.write_bytes("a.bin", b"a" * 10)
    cache = FileCache(tmp_path / "cache", 1000)
    real_link = os.link
    calls: list[str] = []

    def name_gone(source: os.PathLike[str] | str, target: os.PathLike[str] | str) -> None:
        calls.append(str(target))
        if len(calls) == 2:  # the second fetch loses the race
            raise FileNotFoundError(source)
        real_link(source, target)

    monkeypatch.setattr(os, "link", name_gone)
    with cache.workspace("run") as workspace:
        cache.fetch(remote, "a.bin", workspace / "first")
        second = cache.fetch(remote, "a.bin", workspace / "second")
        assert second.read_bytes() == b"a" * 10
        assert second.stat().st_nlink == 1  # a copy, not a link
    assert len(calls) == 2
