"""Corpora: upload a UTF-8 text file, list the uploads, delete one; and how a request names its corpus."""

from __future__ import annotations

import codecs
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from flask import request
from flask_smorest import Blueprint, abort

from schemas.api import CorpusListSchema, CorpusSchema, CorpusUploadSchema, ErrorSchema
from schemas.corpora import UPLOADS_FOLDER, CorpusRecord
from schemas.settings import Settings
from trainer_api.services import Services, services

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
@blp.arguments(CorpusUploadSchema, location="files")
@blp.response(201, CorpusSchema)
@blp.alt_response(413, schema=ErrorSchema, description="The file is over APP__MAX_CORPUS_BYTES.")
def upload_corpus(_: Mapping[str, object]) -> dict[str, object]:
    """Store a UTF-8 text file under the corpus root; train on it by its corpus_id."""
    found = services()
    upload = request.files["file"]  # the schema has checked it is there
    corpus_id = uuid.uuid4().hex
    folder = found.settings.corpus_root / UPLOADS_FOLDER
    path, copied = store_upload(upload.stream, folder, corpus_id, found.settings.max_corpus_bytes)
    record = CorpusRecord(
        corpus_id=corpus_id,
        name=display_name(upload.filename, corpus_id),
        bytes=copied.bytes,
        lines=copied.lines,
        created_at=time.time(),
        path=str(path),
    )
    try:
        found.corpora.add(record)
    except Exception:
        path.unlink(missing_ok=True)  # a file no record names could never be deleted through the API
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
def delete_corpus(corpus_id: str) -> None:
    """Forget the corpus and remove its file; runs already queued on it will fail."""
    found = services()
    record = found.corpora.get(corpus_id)
    if record is None:
        abort(404, message=f"no corpus {corpus_id!r}")
    assert record is not None
    found.corpora.delete(corpus_id)
    Path(record.path).unlink(missing_ok=True)


def display_name(filename: str | None, corpus_id: str) -> str:
    """The upload's own base name (a label only, never a path we use); the id when it has none."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    return base[:MAX_NAME_CHARS] or f"{corpus_id}.txt"


def store_upload(source: IO[bytes], folder: Path, corpus_id: str, limit: int) -> tuple[Path, CopiedText]:
    """Copy under a temporary name, then rename: a half-written corpus never appears under its own."""
    folder.mkdir(parents=True, exist_ok=True)
    final = (folder / f"{corpus_id}.txt").resolve()
    partial = folder / f".{corpus_id}.part"
    try:
        with partial.open("wb") as sink:
            copied = copy_text(source, sink, limit)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final, copied


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


def resolve_corpus(root: Path, value: str) -> Path | None:
    """The corpus file inside `root`, absolute or relative to it; None for anything that leads out."""
    base = root.resolve()
    candidate = Path(value)
    try:
        # resolve() follows symlinks, so a link that points outside the root is caught here too.
        resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
        inside = resolved.is_relative_to(base) and resolved.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem
        return None
    return resolved if inside else None


def chosen_corpus(body: Mapping[str, object], found: Services) -> tuple[Path | None, dict[str, list[str]]]:
    """The file a body's corpus_id or corpus_path names (the schema let through exactly one), or problems."""
    root = found.settings.corpus_root
    corpus_id = body.get("corpus_id")
    if isinstance(corpus_id, str):
        record = found.corpora.get(corpus_id)
        # An upload whose file has gone is as unusable as an unknown id.
        path = resolve_corpus(root, record.path) if record else None
        return path, {} if path else {"corpus_id": [f"unknown corpus {corpus_id!r}"]}
    path = resolve_corpus(root, str(body.get("corpus_path")))
    return path, {} if path else {"corpus_path": [CORPUS_PATH_PROBLEM]}
