"""Files under one root, a local folder or an S3-compatible bucket prefix, read and written through fsspec."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import TypeVar

import fsspec
import requests
from botocore.exceptions import BotoCoreError

T = TypeVar("T")
S3_SCHEME = "s3://"
# How long one request to the object store may take to connect and to answer each read; botocore's
# own defaults wait a minute each and retry, so a store that is away would hold a run for minutes.
DEFAULT_TIMEOUT_S = 10.0
# botocore tries a request this many times in all when the store does not answer in time, refuses the
# connection, answers 5xx or asks us to slow down (its "standard" backoff: up to 1 s, then 2 s). s3fs's own
# retry loop is turned off: it would retry each of botocore's tries, multiplying the wait.
S3_ATTEMPTS = 3
CHUNK_BYTES = 4 * 1024 * 1024
# A signed URL for one streamed read lives this long (a read that takes longer still completes).
SIGNED_URL_S = 3600


class StoreUnavailable(Exception):
    """The store did not answer, or refused our credentials; the message names the store."""

    def __init__(self, store: str, reason: str) -> None:
        super().__init__(f"{store} failed: {reason}")
        self.store = store
        self.reason = reason


class InvalidKey(ValueError):
    """A key that could lead outside the root: empty, absolute, hidden, `..`, or with odd characters."""


@dataclass(frozen=True)
class StoredFile:
    name: str
    bytes: int
    version: str = field(default="", compare=False)  # as StoredObject.version


@dataclass(frozen=True)
class StoredObject:
    """One file's size and version: the ETag on an object store, the change time and size on a disk."""

    size: int
    version: str


def safe_key(*parts: str) -> str:
    """A key under the root from parts that may each hold `/`; InvalidKey for anything that leads out."""
    segments = [segment for part in parts for segment in part.split("/")]
    for segment in segments:
        if (
            not segment
            or segment.startswith(".")
            or any(ord(char) < 32 or char in '\\"' for char in segment)
            or len(segment) > 255
        ):
            raise InvalidKey(f"not a valid name inside the store: {'/'.join(parts)!r}")
    return "/".join(segments)


class Storage:
    """One root: every key is a relative path under it, built by safe_key from validated ids and names."""

    def __init__(self, root: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.is_local = not root.startswith(S3_SCHEME)
        self._timeout_s = timeout_s
        self._http = requests.Session()
        self.root = root.rstrip("/") if len(root) > 1 else root
        if self.is_local:
            self._base = str(Path(self.root).absolute())
            self._fs = fsspec.filesystem("file")
        else:
            self._base = self.root[len(S3_SCHEME) :]
            if not self._base:
                raise ValueError(f"an object-store root names a bucket: {root!r}")
            self._fs = fsspec.filesystem(
                "s3",
                # botocore reads AWS_ENDPOINT_URL too, but not every s3fs release passes it on.
                endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                skip_instance_cache=True,
                # Other processes write here too: a listing remembered from earlier would hide their files.
                use_listings_cache=False,
                config_kwargs={
                    "connect_timeout": timeout_s,
                    "read_timeout": timeout_s,
                    "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
                },
            )
            self._fs.retries = 1

    def describe(self) -> str:
        """The store as an operator knows it, for error messages: the root, and the endpoint for S3."""
        if self.is_local:
            return f"the file store {self._base}"
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return f"the object store {self.root} at {endpoint}"

    def _path(self, key: str) -> str:
        return f"{self._base}/{safe_key(key)}" if key else self._base

    def url(self, key: str = "") -> str:
        """Where a key lives, as every process understands it: an absolute local path or an s3:// URL."""
        path = self._path(key)
        return path if self.is_local else S3_SCHEME + path

    def local_path(self, key: str) -> Path | None:
        """The file itself on a local root; None on an object store."""
        return Path(self._path(key)) if self.is_local else None

    @contextlib.contextmanager
    def _reaching(self, writing: bool = False) -> Iterator[None]:
        """A store that fails on the wire becomes StoreUnavailable; a missing key stays FileNotFoundError.

        When writing, nothing can be missing but the bucket itself: that is a store to fix, not a key.
        """
        try:
            yield
        except FileNotFoundError as exc:
            if writing:
                raise StoreUnavailable(self.describe(), str(exc)) from exc
            raise
        except (OSError, BotoCoreError) as exc:
            raise StoreUnavailable(self.describe(), f"{type(exc).__name__}: {exc}") from exc

    def exists(self, key: str) -> bool:
        with self._reaching():
            return bool(self._fs.exists(self._path(key)))

    def is_file(self, key: str) -> bool:
        """A file (not a folder or prefix) at the key; a store that fails raises (fsspec's isfile would
        answer False, and a missing store would read as a missing file)."""
        try:
            self.info(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        with self._reaching():
            return answered(self._fs.size(self._path(key)), int, f"the size of {key!r}")

    def info(self, key: str) -> StoredObject:
        """The file's size and version; FileNotFoundError when there is none."""
        with self._reaching():
            details = answered(self._fs.info(self._path(key)), dict, f"the details of {key!r}")
        if details.get("type") != "file":
            raise FileNotFoundError(f"{key!r} is not a file")
        return StoredObject(answered(details.get("size"), int, f"the size of {key!r}"), _version(details))

    def chunks(
        self, key: str, start: int = 0, length: int | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The key's bytes from `start`, `length` of them (all by default), in chunks as they are read."""
        if length == 0:
            return
        if not self.is_local:
            yield from self._object_chunks(key, start, length, chunk_bytes)
            return
        with self._reaching():
            handle = self._fs.open(self._path(key), "rb")
        try:
            with self._reaching():
                handle.seek(start)
            left = length
            while left is None or left > 0:
                with self._reaching():
                    chunk = answered(
                        handle.read(chunk_bytes if left is None else min(chunk_bytes, left)), bytes, key
                    )
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    def _object_chunks(self, key: str, start: int, length: int | None, chunk_bytes: int) -> Iterator[bytes]:
        """One GET of the range, signed by s3fs and streamed by urllib3 (aiobotocore reads large bodies at
        about a quarter of urllib3's speed: docs/BENCHMARKS.md, "Downloads through the API")."""
        last = "" if length is None else str(start + length - 1)
        with self._reaching():
            url = answered(self._fs.url(self._path(key), expires=SIGNED_URL_S), str, f"a URL for {key!r}")
            response = self._http.get(
                url, headers={"Range": f"bytes={start}-{last}"}, stream=True, timeout=self._timeout_s
            )
        with response:
            if response.status_code == HTTPStatus.NOT_FOUND:
                raise FileNotFoundError(f"no {key!r} in {self.describe()}")
            if response.status_code == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
                return  # `start` is at or past the end: nothing to read, as from a local file
            if response.status_code not in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                raise StoreUnavailable(self.describe(), f"HTTP {response.status_code} reading {key!r}")
            with self._reaching():
                yield from response.iter_content(chunk_bytes)

    def read_bytes(self, key: str) -> bytes:
        with self._reaching():
            return answered(self._fs.cat_file(self._path(key)), bytes, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Whole or not at all: a local file is renamed into place, an object appears in one PUT."""
        path = self._path(key)
        with self._reaching(writing=True):
            if self.is_local:
                _atomic_local_write(Path(path), data)
            else:
                self._fs.pipe_file(path, data)

    def upload(self, source: Path, key: str) -> None:
        """Copy a local file to the key; on a local root it is renamed into place whole."""
        path = self._path(key)
        with self._reaching(writing=True):
            if self.is_local:
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
                try:
                    shutil.copyfile(source, partial)
                    os.replace(partial, target)
                finally:
                    partial.unlink(missing_ok=True)
            else:
                self._fs.put_file(str(source), path)

    def upload_folder(self, source: Path, prefix: str, last: str) -> None:
        """Every plain file of a local folder under `prefix`, `last` after all the others.

        An object store cannot rename a folder into place: readers take the presence of `last` to mean
        the folder is whole, so a writer that dies part way leaves nothing they would read.
        """
        names = sorted(entry.name for entry in source.iterdir() if entry.is_file())
        for name in sorted(names, key=lambda name: name == last):
            self.upload(source / name, safe_key(prefix, name))

    def download(self, key: str, target: Path) -> None:
        """Copy the key to a local file, renamed into place whole; FileNotFoundError when absent."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with self._reaching():
                self._fs.get_file(self._path(key), str(partial))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def files(self, prefix: str) -> list[StoredFile]:
        """The plain files directly under a prefix, by name, hidden ones left out; [] when there are none.

        A symlink on a local root is no plain file (fsspec lists it as "other"): it could lead anywhere
        on the machine, so nothing that serves these files ever follows one.
        """
        with self._reaching():
            try:
                entries = answered(
                    self._fs.ls(self._path(prefix), detail=True), list, f"the list of {prefix!r}"
                )
            except FileNotFoundError:
                return []
        found: list[StoredFile] = []
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("type") != "file":
                continue
            name = PurePosixPath(str(entry.get("name", ""))).name
            size = entry.get("size")
            if name and not name.startswith(".") and isinstance(size, int):
                found.append(StoredFile(name=name, bytes=size, version=_version(entry)))
        return sorted(found, key=lambda stored: stored.name)

    def remove(self, prefix: str) -> None:
        """Delete a key, or everything under a prefix; nothing there is not an error."""
        path = self._path(prefix)
        with self._reaching():
            try:
                self._fs.rm(path, recursive=True)
            except FileNotFoundError:
                return
        parent = Path(path).parent
        if self.is_local and parent != Path(self._base):
            # The local filesystem leaves the emptied folder of a key's prefix behind (never the root's).
            with contextlib.suppress(OSError):
                parent.rmdir()

    def ping(self) -> None:
        """StoreUnavailable unless the root answers (a local root is created when missing)."""
        with self._reaching(writing=True):
            if self.is_local:
                Path(self._base).mkdir(parents=True, exist_ok=True)
            else:
                bucket = self._base.split("/", 1)[0]
                self._fs.ls(bucket, refresh=True)


def _version(details: dict[str, object]) -> str:
    """An object's ETag; a local file's change time and size (fsspec's listing and details agree on both)."""
    etag = details.get("ETag")
    return str(etag).strip('"') if etag else f"{details.get('mtime')}-{details.get('size')}"


def answered(value: object, kind: type[T], what: str) -> T:
    """A value fsspec answered (its API is untyped), checked to be what its documentation promises."""
    if not isinstance(value, kind):
        raise TypeError(f"the store answered {type(value).__name__} for {what}, not {kind.__name__}")
    return value


def _atomic_local_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
