"""One error envelope, `{code, message, request_id}`, for every failure the API can answer."""

from __future__ import annotations

import logging

import redis
from apispec import BasePlugin
from flask import Flask, Response, jsonify
from flask_smorest import Api
from kombu.exceptions import OperationalError
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    InternalServerError,
    RequestedRangeNotSatisfiable,
    ServiceUnavailable,
)

from schemas.api import ErrorSchema
from trainer_api.context import PUBLIC_PATHS, current_request_id
from trainer_store.storage import StoreUnavailable

log = logging.getLogger(__name__)

ERROR_CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    # A Range outside the file is a bad request in DESIGN's list of codes.
    416: "BAD_REQUEST",
    422: "VALIDATION_ERROR",
    429: "TOO_MANY_REQUESTS",
    503: "SERVICE_UNAVAILABLE",
    500: "INTERNAL",
}
# The backing services being down is the caller's cue to retry later, not a bug.
UNAVAILABLE_ERRORS = (redis.RedisError, OperationalError, StoreUnavailable)
# Routes that reach neither Redis nor the file store.
STANDALONE_PATHS = frozenset({"/healthz", "/models"})


class CommonErrors(BasePlugin):
    """Documents, on every operation they apply to, the errors that come from the route's shape rather
    than its logic: a path naming something unknown, a malformed or oversized body, a missing API key,
    Redis unavailable. Each route documents its own (409, 429...) itself; this never overrides them."""

    def operation_helper(
        self, path: str | None = None, operations: dict[str, dict[str, object]] | None = None, **_: object
    ) -> None:
        for operation in (operations or {}).values():
            responses = operation.setdefault("responses", {})
            assert isinstance(responses, dict)  # apispec's operation object: responses by status
            for status, reference in self._applicable(path or "", operation):
                # Response components flask-smorest registers for every status, in our envelope.
                responses.setdefault(status, reference)

    @staticmethod
    def _applicable(path: str, operation: dict[str, object]) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        if "{" in path:
            found.append((404, "NOT_FOUND"))
        if "requestBody" in operation:
            found += [
                (400, "BAD_REQUEST"),
                (413, "REQUEST_ENTITY_TOO_LARGE"),
                (415, "UNSUPPORTED_MEDIA_TYPE"),
            ]
        if path not in PUBLIC_PATHS:
            found.append((401, "UNAUTHORIZED"))
        if path not in STANDALONE_PATHS:
            found.append((503, "SERVICE_UNAVAILABLE"))
        return found


class TrainerApi(Api):
    """flask-smorest's Api with our envelope for HTTP errors, routing errors and crashes alike."""

    ERROR_SCHEMA = ErrorSchema

    def __init__(self, app: Flask) -> None:
        super().__init__(app, spec_kwargs={"extra_plugins": [CommonErrors()]})

    def handle_http_exception(self, error: HTTPException) -> Response:
        return error_response(error)


def error_response(error: HTTPException) -> Response:
    status = error.code or 500
    original = getattr(error, "original_exception", None)
    if isinstance(original, RecursionError):
        # JSON nested deeper than the parser can follow is a malformed body, not a crash.
        error, status = BadRequest("the body is nested too deeply"), 400
    elif isinstance(original, UNAVAILABLE_ERRORS):
        log.warning("backing service unavailable: %s", original)
        error, status = ServiceUnavailable(), 503
    elif isinstance(error, InternalServerError):
        # Never show an exception's text: it may hold paths, hosts or secrets.
        log.error("unhandled error", exc_info=original)
    code = ERROR_CODES.get(status, "INTERNAL" if status >= 500 else "BAD_REQUEST")
    body: dict[str, object] = {
        "code": code,
        "message": _message(error, status),
        "request_id": current_request_id(),
    }
    fields = _field_errors(getattr(error, "data", None))
    if fields:
        body["errors"] = fields
        body["message"] = "invalid field(s): " + ", ".join(sorted(fields))
    response = jsonify(body)
    response.status_code = status
    data = getattr(error, "data", None)
    if isinstance(data, dict) and isinstance(data.get("headers"), dict):
        # abort(..., headers={"Retry-After": ...}) from a view.
        response.headers.update({str(name): str(value) for name, value in data["headers"].items()})
    if status == 405 and isinstance(error, HTTPException):
        response.headers["Allow"] = ", ".join(getattr(error, "valid_methods", None) or [])
    if isinstance(error, RequestedRangeNotSatisfiable) and error.length is not None:
        # RFC 9110: a 416 says how long the file is, so the client can ask again.
        response.headers["Content-Range"] = f"bytes */{error.length}"
    return response


_MESSAGES: dict[int, str] = {
    401: "a valid X-Api-Key header is required",
    404: "no such resource",
    405: "method not allowed on this resource",
    413: "request body too large",
    415: "the body must be JSON (Content-Type: application/json)",
    416: "the requested range is outside the file",
    500: "internal error; the request_id identifies it in the server log",
    503: "a backing service is unavailable; try again shortly",
}


def _message(error: HTTPException, status: int) -> str:
    data = getattr(error, "data", None)
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    if isinstance(data, dict) and isinstance(data.get("messages"), dict):
        # webargs reports an unparsable body as {"json": ["Invalid JSON body."]}.
        return "; ".join(
            f"{location}: {' '.join(map(str, texts))}"
            for location, texts in data["messages"].items()
            if isinstance(texts, list)
        ) or _MESSAGES.get(status, error.name)
    if status in _MESSAGES:
        return _MESSAGES[status]
    return error.description or error.name


def _field_errors(data: object) -> dict[str, list[str]]:
    """Flatten webargs' `{location: {field: [messages]}}` into `{field: [messages]}`."""
    if not isinstance(data, dict):
        return {}
    raw = data.get("errors") or data.get("messages")
    if not isinstance(raw, dict):
        return {}
    flat: dict[str, list[str]] = {}
    for location_errors in raw.values():
        if isinstance(location_errors, dict):
            for name, messages in location_errors.items():
                flat[str(name)] = _texts(messages)
    return flat


def _texts(messages: object) -> list[str]:
    if isinstance(messages, list):
        return [str(message) for message in messages]
    if isinstance(messages, dict):
        # Nested fields (a dict inside a field) report per key.
        return [f"{key}: {', '.join(_texts(value))}" for key, value in messages.items()]
    return [str(messages)]
