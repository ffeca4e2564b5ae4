"""A run's artifact folder: list its files, download one (HTTP Range supported); nothing else is served."""

from __future__ import annotations

from pathlib import Path

from flask import Response, send_from_directory
from flask_smorest import Blueprint, abort

from schemas.api import ArtifactListSchema, ErrorSchema
from trainer_api.services import run_or_404, services

blp = Blueprint("artifacts", __name__, url_prefix="/runs", description="Trained models' files")

FILE_RESPONSES = {
    "200": {
        "description": "The whole file.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "206": {"description": "The byte range asked for with a Range header."},
}


@blp.route("/<string:run_id>/artifact")
@blp.response(200, ArtifactListSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run, or no artifacts yet.")
def list_artifact(run_id: str) -> dict[str, object]:
    """The files of the run's artifact folder, by name, with their sizes."""
    folder = artifact_folder(run_id)
    files = [
        {"name": entry.name, "bytes": entry.stat().st_size}
        for entry in sorted(folder.iterdir())
        if servable(folder, entry.name)
    ]
    return {"run_id": run_id, "files": files}


@blp.route("/<string:run_id>/artifact/<string:name>")
@blp.doc(responses=FILE_RESPONSES)
@blp.alt_response(404, schema=ErrorSchema, description="No such run or file.")
@blp.alt_response(416, schema=ErrorSchema, description="A range outside the file.")
def download_artifact(run_id: str, name: str) -> Response:
    """One file of the run's artifact folder; send a Range header for part of it."""
    folder = artifact_folder(run_id)
    if not servable(folder, name):
        abort(404, message=f"run {run_id!r} has no artifact file {name!r}")
    # An absolute folder: Flask would read a relative one against the package's own folder.
    return send_from_directory(folder, name, conditional=True, as_attachment=True)


def artifact_folder(run_id: str) -> Path:
    """The run's model folder, absolute; 404 for an unknown run or one that has not written it yet."""
    found = services()
    run_or_404(run_id)
    folder = found.settings.model_dir(run_id).absolute()
    if not folder.is_dir():
        abort(404, message=f"run {run_id!r} has no artifacts yet; they appear when training completes")
    return folder


def servable(folder: Path, name: str) -> bool:
    """A plain file directly in the folder: no links, subfolders or hidden (temporary) files."""
    if name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
        return False
    entry = folder / name
    return not entry.is_symlink() and entry.is_file()
