"""Signed links: a path that works without the API key until it expires (an HMAC over path and expiry)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from urllib.parse import urlencode

from flask import request
from flask_smorest import Blueprint, abort

from schemas.api import ErrorSchema, LinkRequestSchema, LinksSchema
from trainer_api.services import run_or_404, services

blp = Blueprint("links", __name__, url_prefix="/runs", description="Links that need no API key")

EXPIRES = "expires"
SIGNATURE = "signature"
SECRET_VARIABLE = "SECURITY__LINK_SECRET"
# The only paths a signature opens; anything else still needs the key.
SIGNABLE_PATHS = (
    re.compile(r"/runs/[0-9A-Za-z_-]+/model\.zip"),
    re.compile(r"/runs/[0-9A-Za-z_-]+/events"),
)


def model_zip_path(run_id: str) -> str:
    return f"/runs/{run_id}/model.zip"


def events_path(run_id: str) -> str:
    return f"/runs/{run_id}/events"


def signature(secret: str, path: str, expires: int) -> str:
    message = f"{path}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed(secret: str, path: str, expires: int) -> str:
    """The path with its expiry and signature in the query."""
    return f"{path}?{urlencode({EXPIRES: expires, SIGNATURE: signature(secret, path, expires)})}"


@blp.route("/<string:run_id>/links", methods=["POST"])
@blp.arguments(LinkRequestSchema())
@blp.response(201, LinksSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
@blp.alt_response(503, schema=ErrorSchema, description=f"{SECRET_VARIABLE} is not set.")
def create_links(body: Mapping[str, object], run_id: str) -> dict[str, object]:
    """Links to the run's model and to its events that work with no header at all until `expires_at`."""
    secret = services().settings.link_secret
    if not secret:
        abort(503, message=f"signed links are switched off: set {SECRET_VARIABLE} on the API")
    assert secret is not None  # abort raises; flask-smorest's untyped abort hides that from mypy
    run_or_404(run_id)
    ttl_s = body["ttl_s"]
    assert isinstance(ttl_s, int)  # the schema loads an integer
    expires = int(time.time()) + ttl_s
    return {
        "download": signed(secret, model_zip_path(run_id), expires),
        "events": signed(secret, events_path(run_id), expires),
        "expires_at": expires,
    }


def signed_request() -> bool:
    """True for a request whose signed link is valid; 403 for one that is tampered or expired.

    False when the request carries no signature, or is on a path a signature cannot open: the key
    decides then.
    """
    if SIGNATURE not in request.args and EXPIRES not in request.args:
        return False
    if not any(pattern.fullmatch(request.path) for pattern in SIGNABLE_PATHS):
        return False
    secret = services().settings.link_secret
    expires = request.args.get(EXPIRES, "")
    offered = request.args.get(SIGNATURE, "")
    if not secret or not expires.isascii() or not expires.isdigit():
        abort(403, message="this link is not valid; ask for a new one")
    expected = signature(str(secret), request.path, int(expires))
    # Constant time: how long the comparison takes must not reveal how much of a guess was right.
    if not hmac.compare_digest(offered.encode(), expected.encode()):
        abort(403, message="this link is not valid; ask for a new one")
    if int(expires) < time.time():
        abort(403, message="this link has expired; ask for a new one")
    return True
