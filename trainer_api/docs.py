"""Swagger UI's scripts and styles served by the API itself, from the swagger-ui-bundle package: no CDN."""

from __future__ import annotations

from flask import Blueprint, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

# Under /docs/, which the API-key check leaves open with the page itself.
ASSETS_URL = "/docs/assets/"

assets = Blueprint("swagger_ui_assets", __name__)


@assets.route(f"{ASSETS_URL}<path:filename>")
def asset(filename: str) -> Response:
    return send_from_directory(swagger_ui_path, filename)
