"""A worker's local copies of what it downloaded from the store, least recently used evicted first.

Several worker processes on one machine may share the folder. Each cached file is named by the hash of
its URL and version (so a changed object is a new entry) and is handed out as a hard link in a
scratch folder: a copy in use survives its eviction, and a reader holds a shared lock only while it
links. Eviction takes an exclusive lock on each file it removes and skips any it cannot get.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from trainer_store.storage import Storage, safe_key

# A download that has not finished in this long was left behind by a process that died.
STALE_PART_S = 3600.0


class FileCache:
    """Copies of remote files under `root/objects`, scratch folders under `root/work`."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._objects = root / "objects"
        self._work = root / "work"

    @contextlib.contextmanager
    def workspace(self, name: str) -> Iterator[Path]:
        """A scratch folder of one task's own, removed when the block ends."""
        folder = self._work / f"{name}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def fetch(self, storage: Storage, key: str, target: Path) -> Path:
        """A local file with the key's content: the file itself on a local root, else `target` (inside a
        workspace), linked to the cached copy; FileNotFoundError when the store has no such file."""
        local = storage.local_path(key)
        if local is not None:
            if not local.is_file():
                raise FileNotFoundError(f"{storage.url(key)} is not a file")
            return local
        stored = storage.info(key)
        entry = self._objects / hashlib.sha256(f"{storage.url(key)}\0{stored.version}".encode()).hexdigest()
        target.parent.mkdir(parents=True, exist_ok=True)
        if not self._link_cached(entry, target):
            self._download_and_link(storage, key, entry, target)
        return target

    def fetch_folder(self, storage: Storage, prefix: str, names: Iterable[str], target: Path) -> Path:
        """A local folder holding the named files of `prefix`: the folder itself on a local root."""
        local = storage.local_path(prefix)
        if local is not None:
            return local
        for name in names:
            self.fetch(storage, safe_key(prefix, name), target / name)
        return target

    def _link_cached(self, entry: Path, target: Path) -> bool:
        try:
            handle = os.open(entry, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                # Evicted between our open and our lock: the name is gone or names a newer download.
                if os.fstat(handle).st_ino != os.stat(entry).st_ino:
                    return False
            except FileNotFoundError:
                return False
            os.utime(handle)  # the file's time is its place in the least-recently-used order
            _link(handle, entry, target)
            return True
        finally:
            os.close(handle)  # and with it the lock

    def _download_and_link(self, storage: Storage, key: str, entry: Path, target: Path) -> None:
        self._objects.mkdir(parents=True, exist_ok=True)
        partial = self._objects / f".{entry.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            storage.download(key, partial)
            handle = os.open(partial, os.O_RDONLY)
            try:
                fcntl.flock(handle, fcntl.LOCK_SH)  # ours until linked: eviction passes it by
                os.replace(partial, entry)
                self._evict()
                _link(handle, entry, target)
            finally:
                os.close(handle)
        finally:
            partial.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Remove the least recently used copies until the cache fits; one process evicts at a time."""
        with open(self.root / ".evict.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is evicting
            entries: list[tuple[float, Path, int]] = []
            for path in self._objects.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    found = path.stat()
                    if not path.name.startswith("."):
                        entries.append((found.st_mtime, path, found.st_size))
                    elif found.st_mtime < time.time() - STALE_PART_S:
                        path.unlink()
            total = sum(size for _, _, size in entries)
            for _, path, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if _remove_unused(path):
                    total -= size


def _remove_unused(path: Path) -> bool:
    try:
        handle = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # being linked right now
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(handle)


def _link(handle: int, entry: Path, target: Path) -> None:
    """A link to the entry; a copy of the file we hold open when the name went in the meantime (another
    process's download of the same version took the name, and was evicted before we linked it)."""
    target.unlink(missing_ok=True)
    try:
        os.link(entry, target)
    except FileNotFoundError:
        with os.fdopen(os.dup(handle), "rb") as source, target.open("wb") as copy:
            source.seek(0)
            shutil.copyfileobj(source, copy)
