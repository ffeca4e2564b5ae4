"""Per-request context: the X-Request-ID every response carries, and the API-key check."""

from __future__ import annotations

import hmac
import re
import uuid

from flask import Flask, Response, abort, current_app, g, request

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-Api-Key"
_VALID_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/openapi.json"})
API_KEY_CONFIG = "TRAINER_API_KEY"


def current_request_id() -> str:
    """The caller's X-Request-ID when it is printable ASCII of at most 128 characters, else a new one."""
    if "request_id" not in g:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = offered if _VALID_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
    request_id: str = g.request_id
    return request_id


def require_api_key() -> None:
    expected = current_app.config.get(API_KEY_CONFIG)
    if not expected or request.path in PUBLIC_PATHS or request.path.startswith("/docs/"):
        return
    offered = request.headers.get(API_KEY_HEADER, "")
    # Constant-time comparison: timing must not reveal how much of a guess was right.
    if not hmac.compare_digest(offered.encode(), str(expected).encode()):
        abort(401)


def require_json_body() -> None:
    if request.method in ("POST", "PUT", "PATCH") and request.content_length and not request.is_json:
        abort(415)


def stamp_request_id(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = current_request_id()
    return response


def assign_request_id() -> None:
    current_request_id()


def install(app: Flask) -> None:
    app.before_request(assign_request_id)
    app.before_request(require_api_key)
    app.before_request(require_json_body)
    app.after_request(stamp_request_id)
