"""A run's artifact folder in the store: list its files, stream one (HTTP Range supported) or all as a zip."""

from __future__ import annotations

import itertools
import mimetypes
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import zipstream
from flask import Response, request
from flask_smorest import Blueprint, abort
from werkzeug.exceptions import RequestedRangeNotSatisfiable

from schemas.api import ArtifactListSchema, ErrorSchema
from trainer_api.services import run_or_404, services
from trainer_store.layout import MANIFEST, model_folder
from trainer_store.storage import Storage, StoredFile, answered, safe_key

blp = Blueprint("artifacts", __name__, url_prefix="/runs", description="Trained models' files")

FILE_RESPONSES = {
    "200": {
        "description": "The whole file.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "206": {"description": "The byte range asked for with a Range header."},
    "304": {"description": "Unchanged since the ETag sent in If-None-Match."},
}
ZIP_RESPONSES = {
    "200": {
        "description": "The model folder as one uncompressed .zip; Content-Length is sent up front.",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    },
}


@blp.route("/<string:run_id>/artifact")
@blp.response(200, ArtifactListSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run, or no artifacts yet.")
@blp.alt_response(503, schema=ErrorSchema, description="The store is unavailable.")
def list_artifact(run_id: str) -> dict[str, object]:
    """The files of the run's artifact folder, by name, with their sizes."""
    files = artifact_folder(run_id).files
    return {"run_id": run_id, "files": [{"name": found.name, "bytes": found.bytes} for found in files]}


@blp.route("/<string:run_id>/artifact/<string:name>")
@blp.doc(responses=FILE_RESPONSES)
@blp.alt_response(404, schema=ErrorSchema, description="No such run or file.")
@blp.alt_response(416, schema=ErrorSchema, description="A range outside the file.")
@blp.alt_response(503, schema=ErrorSchema, description="The store is unavailable.")
def download_artifact(run_id: str, name: str) -> Response:
    """One file of the run's artifact folder; send a Range header for part of it."""
    folder = artifact_folder(run_id)
    found = next((found for found in folder.files if found.name == name), None)
    if found is None:
        abort(404, message=f"run {run_id!r} has no artifact file {name!r}")
    assert found is not None
    return stored_file_response(services().artifact_files, safe_key(folder.key, name), found)


@blp.route("/<string:run_id>/model.zip")
@blp.doc(responses=ZIP_RESPONSES)
@blp.alt_response(404, schema=ErrorSchema, description="No such run, or no model yet.")
@blp.alt_response(503, schema=ErrorSchema, description="The store is unavailable.")
def download_model_zip(run_id: str) -> Response:
    """The run's whole model folder as one .zip that `from_pretrained` loads once unpacked; no Range."""
    folder = artifact_folder(run_id)
    size, body = model_archive(services().artifact_files, folder)
    return Response(
        body,
        mimetype="application/zip",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="model-{run_id}.zip"',
            "Accept-Ranges": "none",
        },
    )


def model_archive(storage: Storage, folder: ArtifactFolder) -> tuple[int, Iterator[bytes]]:
    """The folder's plain files as a stored (uncompressed) zip: its exact size, and its bytes as read."""
    archive = zipstream.ZipStream(sized=True)
    for stored in folder.files:
        # Each file is opened only when the zip reaches it, and read in chunks.
        archive.add(storage.chunks(safe_key(folder.key, stored.name)), stored.name, size=stored.bytes)
    return answered(len(archive), int, "the zip's size"), _bytes_of(archive)


def _bytes_of(archive: Iterable[object]) -> Iterator[bytes]:
    for chunk in archive:
        yield answered(chunk, bytes, "a chunk of the zip")


@dataclass(frozen=True)
class ArtifactFolder:
    key: str  # under the artifacts root
    files: list[StoredFile]  # plain files directly in it: no subfolders, links or hidden (temporary) files


def artifact_folder(run_id: str) -> ArtifactFolder:
    """The run's model folder in the artifacts root, in one listing; 404 for an unknown run, or until the
    folder is whole (the worker writes manifest.json after every other file)."""
    run_or_404(run_id)
    key = model_folder(run_id)
    files = services().artifact_files.files(key)
    if MANIFEST not in {found.name for found in files}:
        abort(404, message=f"run {run_id!r} has no artifacts yet; they appear when training completes")
    return ArtifactFolder(key, files)


def stored_file_response(storage: Storage, key: str, stored: StoredFile) -> Response:
    """The file streamed from the store as a download: its ETag (304 when the client has it), and a
    single byte range (206, or 416 outside the file) read from the store alone."""
    if request.if_none_match.contains(stored.version):
        unchanged = Response(status=304)
        unchanged.set_etag(stored.version)
        return unchanged
    start, length, status = 0, stored.bytes, 200
    asked = request.range
    # A range of other units, or several ranges, is ignored: the whole file is a valid answer.
    if asked is not None and asked.units == "bytes" and len(asked.ranges) == 1:
        bounds = asked.range_for_length(stored.bytes)
        if bounds is None:
            raise RequestedRangeNotSatisfiable(length=stored.bytes)
        start, length, status = bounds[0], bounds[1] - bounds[0], 206
    chunks = storage.chunks(key, start, length)
    # The first read happens here, so a store that fails is a 503, not a download cut short.
    first = next(chunks, b"")
    response = Response(
        itertools.chain([first], chunks),
        status=status,
        mimetype=mimetypes.guess_type(stored.name)[0] or "application/octet-stream",
        direct_passthrough=True,
    )
    response.content_length = length
    response.accept_ranges = "bytes"
    response.set_etag(stored.version)
    response.headers.set("Content-Disposition", "attachment", filename=stored.name)
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{stored.bytes}"
    return response
