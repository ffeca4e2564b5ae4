"""Corpora: upload a UTF-8 text file, list the uploads, delete one; and how a request names its corpus."""

from __future__ import annotations

import codecs
import contextlib
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from flask import request
from flask_smorest import Blueprint, abort

from schemas.api import CorpusListSchema, CorpusSchema, CorpusUploadSchema, ErrorSchema
from trainer_api.deletion import retire_or_abort
from trainer_api.idempotency import idempotent
from trainer_api.services import Services, services
from trainer_store.corpora import CorpusRecord
from trainer_store.layout import corpus_key, upload_key
from trainer_store.settings import Settings
from trainer_store.storage import Storage, StoreUnavailable

blp = Blueprint("corpora", __name__, url_prefix="/corpora", description="Uploaded text corpora")

UPLOAD_ENDPOINT = "corpora.upload_corpus"
# Multipart framing (boundaries, part headers, the file name) on top of the file itself.
UPLOAD_FRAMING_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_NAME_CHARS = 255
CORPUS_PATH_PROBLEM = "must name an existing file inside the corpus root"


def upload_body_limit(settings: Settings) -> int:
    """The body limit of the upload route; the file itself is held to max_corpus_bytes exactly."""
    return settings.max_corpus_bytes + UPLOAD_FRAMING_BYTES


@dataclass(frozen=True)
class CopiedText:
    bytes: int
    lines: int


@blp.route("", methods=["POST"])
@idempotent
@blp.arguments(CorpusUploadSchema(), location="files")
@blp.response(201, CorpusSchema)
@blp.alt_response(413, schema=ErrorSchema, description="The file is over APP__MAX_CORPUS_BYTES.")
@blp.alt_response(503, schema=ErrorSchema, description="The store or Redis is unavailable; nothing is kept.")
def upload_corpus(_: Mapping[str, object]) -> dict[str, object]:
    """Store a UTF-8 text file in the corpus root; train on it by its corpus_id."""
    found = services()
    upload = request.files["file"]  # the schema has checked it is there
    corpus_id = uuid.uuid4().hex
    key = upload_key(corpus_id)
    copied = store_upload(upload.stream, found.corpus_files, key, found.settings.max_corpus_bytes)
    record = CorpusRecord(
        corpus_id=corpus_id,
        name=display_name(upload.filename, corpus_id),
        bytes=copied.bytes,
        lines=copied.lines,
        created_at=time.time(),
        path=key,
    )
    try:
        found.corpora.add(record)
    except Exception:
        # A file no record names could never be deleted through the API.
        with contextlib.suppress(StoreUnavailable):
            found.corpus_files.remove(key)
        raise
    return {"corpus_id": corpus_id, "name": record.name, "bytes": record.bytes, "lines": record.lines}


@blp.route("", methods=["GET"])
@blp.response(200, CorpusListSchema)
def list_corpora() -> dict[str, object]:
    """Every uploaded corpus, newest first."""
    return {
        "corpora": [
            {
                "corpus_id": record.corpus_id,
                "name": record.name,
                "bytes": record.bytes,
                "lines": record.lines,
                "created_at": record.created_at,
            }
            for record in services().corpora.list()
        ]
    }


@blp.route("/<string:corpus_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(404, schema=ErrorSchema, description="No such corpus.")
@blp.alt_response(409, schema=ErrorSchema, description="A queued or running run trains on it.")
def delete_corpus(corpus_id: str) -> None:
    """Forget the corpus and remove its file; refused while a queued or running run trains on it."""
    found = services()
    record = found.corpora.get(corpus_id)
    if record is None:
        abort(404, message=f"no corpus {corpus_id!r}")
    assert record is not None
    retire_or_abort(found.store.retire_corpus(corpus_id), f"corpus {corpus_id!r}")
    # The file first: if the store fails the record stays, and the delete can be tried again.
    key = corpus_key(found.corpus_files, record.path)  # None when the file has gone already
    if key is not None:
        found.corpus_files.remove(key)
    found.corpora.delete(corpus_id)


def display_name(filename: str | None, corpus_id: str) -> str:
    """The upload's own base name (a label only, never a path we use); the id when it has none."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    return base[:MAX_NAME_CHARS] or f"{corpus_id}.txt"


def store_upload(source: IO[bytes], storage: Storage, key: str, limit: int) -> CopiedText:
    """Check the text into a temporary file, then put it in the store whole: a corpus that fails a
    check, or a store that fails, leaves nothing behind under its key."""
    with tempfile.NamedTemporaryFile(prefix="corpus-", suffix=".part") as spool:
        copied = copy_text(source, spool, limit)
        spool.flush()
        storage.upload(Path(spool.name), key)
    return copied


def copy_text(source: IO[bytes], sink: IO[bytes], limit: int) -> CopiedText:
    """Copy in chunks, checking UTF-8 and the size as the bytes arrive; 413 or 422 on the first problem."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = newlines = 0
    last = b""
    while chunk := source.read(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            abort(413, message=f"the corpus is larger than the limit of {limit} bytes")
        utf8_or_422(decoder, chunk, final=False)
        newlines += chunk.count(b"\n")
        last = chunk[-1:]
        sink.write(chunk)
    utf8_or_422(decoder, b"", final=True)
    if size == 0:
        abort(422, errors={"files": {"file": ["must not be empty"]}})
    # A last line without its newline still counts.
    return CopiedText(bytes=size, lines=newlines + int(last != b"\n"))


def utf8_or_422(decoder: codecs.IncrementalDecoder, chunk: bytes, final: bool) -> None:
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError:
        abort(422, errors={"files": {"file": ["must be UTF-8 text"]}})


def chosen_corpus(body: Mapping[str, object], found: Services) -> tuple[str | None, dict[str, list[str]]]:
    """The key of the file a body's corpus_id or corpus_path names (the schema let through exactly one),
    or problems: a path outside the root, or no such file, is the field's problem (422)."""
    corpus_id = body.get("corpus_id")
    if isinstance(corpus_id, str):
        record = found.corpora.get(corpus_id)
        # An upload whose file has gone is as unusable as an unknown id.
        key = corpus_key(found.corpus_files, record.path) if record else None
        return key, {} if key else {"corpus_id": [f"unknown corpus {corpus_id!r}"]}
    key = corpus_key(found.corpus_files, str(body.get("corpus_path")))
    return key, {} if key else {"corpus_path": [CORPUS_PATH_PROBLEM]}
