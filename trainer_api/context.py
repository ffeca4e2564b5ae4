"""Per-request context: the X-Request-ID every response carries, the API-key check, body types and limits."""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Mapping

from flask import Flask, Response, abort, current_app, g, redirect, request
from flask_smorest import abort as abort_with_message
from werkzeug.wrappers import Response as WerkzeugResponse

from trainer_api.links import signed_request

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-Api-Key"
_VALID_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/openapi.json"})
API_KEY_CONFIG = "TRAINER_API_KEY"
METRICS_TOKEN_CONFIG = "TRAINER_METRICS_TOKEN"
METRICS_PATH = "/metrics"
# app.extensions key: upload endpoint -> the most body bytes it takes (multipart, not JSON).
UPLOAD_LIMITS = "trainer.upload_limits"
BODY_METHODS = ("POST", "PUT", "PATCH")
MULTIPART = "multipart/form-data"
# app.config key: the stream line's base URL (Settings.stream_url).
STREAM_URL_CONFIG = "TRAINER_STREAM_URL"
# Endpoints that hold their request open for as long as a client follows or downloads.
LONG_ENDPOINTS = frozenset(
    {
        "events.stream_run_events",
        "logs.stream_run_log",
        "artifacts.download_artifact",
        "artifacts.download_model_zip",
    }
)


def current_request_id() -> str:
    """The caller's X-Request-ID when it is printable ASCII of at most 128 characters, else a new one."""
    if "request_id" not in g:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = offered if _VALID_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
    request_id: str = g.request_id
    return request_id


def require_api_key() -> None:
    # A signed link carries its own authorization, and a bad one is refused even without a key set.
    if signed_request():
        return
    expected = current_app.config.get(API_KEY_CONFIG)
    if request.path == METRICS_PATH and current_app.config.get(METRICS_TOKEN_CONFIG):
        _require_metrics_token(expected)
        return
    if not expected or request.path in PUBLIC_PATHS or request.path.startswith("/docs/"):
        return
    if not _matches(request.headers.get(API_KEY_HEADER, ""), expected):
        abort(401)


def _require_metrics_token(api_key: object) -> None:
    """With a metrics token set, `/metrics` takes that bearer token, or the API key when there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _matches(token.strip(), current_app.config[METRICS_TOKEN_CONFIG]):
        return
    if api_key and _matches(request.headers.get(API_KEY_HEADER, ""), api_key):
        return
    abort_with_message(401, message="a valid Authorization: Bearer token (or X-Api-Key) is required")


def _matches(offered: str, expected: object) -> bool:
    # Constant-time comparison: timing must not reveal how much of a guess was right.
    return hmac.compare_digest(offered.encode(), str(expected).encode())


def upload_limit() -> int | None:
    """The body limit of this request's endpoint when it takes uploads; None for JSON routes."""
    limits = current_app.extensions.get(UPLOAD_LIMITS)
    limit = limits.get(request.endpoint) if isinstance(limits, dict) else None
    return limit if isinstance(limit, int) else None


def apply_upload_limit() -> None:
    limit = upload_limit()
    if limit is not None:
        # Set before anything reads the body; every other route keeps MAX_CONTENT_LENGTH.
        request.max_content_length = limit


def require_body_type() -> None:
    """JSON bodies everywhere, except multipart/form-data on upload endpoints."""
    if request.method not in BODY_METHODS or not request.content_length:
        return
    if upload_limit() is None:
        if not request.is_json:
            abort(415)
    elif request.mimetype != MULTIPART:
        abort_with_message(415, message=f"the body must be {MULTIPART}")


def stamp_request_id(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = current_request_id()
    return response


def assign_request_id() -> None:
    current_request_id()


def hand_long_requests_to_the_stream_line() -> WerkzeugResponse | None:
    """A process without threads (the web line's sync workers) would be held by a follower or a download
    until gunicorn's timeout kills it: such requests go, path and query whole, to the stream line."""
    stream_url = current_app.config.get(STREAM_URL_CONFIG)
    if not stream_url or request.environ.get("wsgi.multithread") or request.endpoint not in LONG_ENDPOINTS:
        return None
    # 307: the method, the headers (Range, Last-Event-ID, X-Api-Key) and a signed link's query all stay.
    return redirect(f"{stream_url}{request.full_path.rstrip('?')}", code=307)


def install(app: Flask, upload_limits: Mapping[str, int] | None = None) -> None:
    app.extensions[UPLOAD_LIMITS] = dict(upload_limits or {})
    app.before_request(assign_request_id)
    app.before_request(hand_long_requests_to_the_stream_line)
    app.before_request(require_api_key)
    app.before_request(apply_upload_limit)
    app.before_request(require_body_type)
    app.after_request(stamp_request_id)
