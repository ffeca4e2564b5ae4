"""`Idempotency-Key`: a retried request that creates something answers the first response again."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import ParamSpec

import redis
from flask import Response, current_app, request
from flask.typing import ResponseReturnValue
from flask_smorest import abort

from schemas.api import ErrorSchema
from trainer_api.services import services
from trainer_store.records import decoded, text

log = logging.getLogger(__name__)
P = ParamSpec("P")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
_VALID_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_CHARS}}}")
# A first response is answered again for this long.
KEPT_S = 24 * 3600
# How long a reservation outlives a request that died before answering; a retry after it proceeds.
PENDING_S = 60
# How long a request waits for the answer of the first one with its key before saying 409.
WAIT_S = 10.0
POLL_S = 0.05
CHUNK_BYTES = 1024 * 1024

# Reserves the key for this request unless another holds or answered it. KEYS[1] the key's record.
# ARGV: the request's fingerprint, this request's token, pending ms. Answers 1 when reserved.
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Keeps the answer, only for the request that holds the key. ARGV: token, status, body, mimetype, ms.
_ANSWER = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'body', ARGV[3], 'mimetype', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
# Frees the key after a failed first request, so that a retry can succeed. ARGV: token.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

PARAMETER_DOC: dict[str, object] = {
    "in": "header",
    "name": HEADER,
    "required": False,
    "description": (
        "Makes the request safe to retry: for 24 hours, the same key with the same body answers the "
        "first response again (with `Idempotent-Replayed: true`) instead of creating anything. A key "
        "used with another body is 422; while the first request is still being processed, a second "
        "waits for its answer, or answers 409 after 10 s. A first request that failed frees the key."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS, "pattern": "^[\\x20-\\x7e]+$"},
}
INVALID_KEY_DOC: dict[str, object] = {
    "description": "The Idempotency-Key is malformed, or was used before with another request.",
    "content": {"application/json": {"schema": ErrorSchema}},
}
CONFLICT_DOC: dict[str, object] = {
    "description": "A request with this Idempotency-Key is still being processed; retry shortly.",
    "content": {"application/json": {"schema": ErrorSchema}},
}


def record_key(route: str, key: str) -> str:
    digest = hashlib.sha256(f"{route}\n{key}".encode()).hexdigest()
    return f"trainer:idempotency:{digest}"


def idempotent(view: Callable[P, ResponseReturnValue]) -> Callable[P, Response]:
    """Let a creating route take `Idempotency-Key`; apply it right under `@blp.route`."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        offered = request.headers.get(HEADER)
        if offered is None:
            return current_app.make_response(view(*args, **kwargs))
        if not _VALID_KEY.fullmatch(offered):
            abort(
                422,
                errors={"headers": {HEADER: [f"must be 1 to {MAX_KEY_CHARS} printable ASCII characters"]}},
            )
        return _once(record_key(_route(), offered), request_fingerprint(), lambda: view(*args, **kwargs))

    _document(wrapper)
    return wrapper


def _once(key: str, fingerprint: str, respond: Callable[[], ResponseReturnValue]) -> Response:
    client = services().redis
    token = uuid.uuid4().hex
    reserved = _wait_for_turn(client, key, fingerprint, token)
    if isinstance(reserved, Response):
        return reserved
    try:
        response = current_app.make_response(respond())
    except BaseException:
        _release(client, key, token)
        raise
    if response.status_code >= 400:
        _release(client, key, token)
    else:
        client.register_script(_ANSWER)(
            keys=[key],
            args=[token, response.status_code, response.get_data(), response.mimetype or "", KEPT_S * 1000],
        )
    return response


def _wait_for_turn(client: redis.Redis, key: str, fingerprint: str, token: str) -> Response | None:
    """None once this request holds the key; the first answer when there is one; 409 or 422 otherwise."""
    reserve = client.register_script(_RESERVE)
    deadline = time.monotonic() + WAIT_S
    while True:
        if reserve(keys=[key], args=[fingerprint, token, PENDING_S * 1000]) == 1:
            return None
        found = decoded(client.hgetall(key))
        if found and found.get("fingerprint") != fingerprint:
            abort(
                422,
                errors={"headers": {HEADER: ["was used with another request; use a new key for this one"]}},
            )
        if "status" in found:
            return _replay(client, key)
        if time.monotonic() >= deadline:
            abort(
                409,
                message=f"a request with this {HEADER} is still being processed; retry shortly",
                headers={"Retry-After": "1"},
            )
        time.sleep(POLL_S)


def _replay(client: redis.Redis, key: str) -> Response:
    # The body is read raw: it is the first response's bytes, whatever they encode.
    status, body, mimetype = client.hmget(key, ["status", "body", "mimetype"])
    response = Response(body or b"", status=int(text(status)), mimetype=text(mimetype or "") or None)
    response.headers[REPLAYED_HEADER] = "true"
    return response


def _release(client: redis.Redis, key: str, token: str) -> None:
    try:
        client.register_script(_RELEASE)(keys=[key], args=[token])
    except redis.RedisError as exc:
        # The reservation expires by itself after PENDING_S; a retry waits that long at most.
        log.warning("could not free an %s after a failed request: %s", HEADER, exc)


def _route() -> str:
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    return f"{request.method} {rule}"


def request_fingerprint() -> str:
    """What makes two requests the same: method, path, query and body (JSON compared by value, uploads
    by their files' content)."""
    digest = hashlib.sha256(f"{request.method} {request.path}?{request.query_string.decode()}\n".encode())
    if request.mimetype == "multipart/form-data":
        # In the order sent: a retry sends the same parts in the same order.
        for name, value in request.form.items(multi=True):
            digest.update(json.dumps(["form", name, value]).encode())
        for name, upload in request.files.items(multi=True):
            digest.update(json.dumps(["file", name, upload.filename]).encode())
            while chunk := upload.stream.read(CHUNK_BYTES):
                digest.update(chunk)
            upload.stream.seek(0)  # the view reads the file again
    else:
        digest.update(_canonical(request.get_data()))
    return digest.hexdigest()


def _canonical(body: bytes) -> bytes:
    try:
        parsed: object = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def _document(wrapper: Callable[P, Response]) -> None:
    """Add the header, the 409 and the 422 to the route's OpenAPI operation (flask-smorest's manual doc)."""
    apidoc = copy.deepcopy(wrapper.__dict__.get("_apidoc", {}))
    manual = apidoc.setdefault("manual_doc", {})
    manual.setdefault("parameters", []).append(copy.deepcopy(PARAMETER_DOC))
    documented = apidoc.get("response", {}).get("responses", {})
    if 409 not in documented:  # the route's own 409 says more
        manual.setdefault("responses", {})["409"] = copy.deepcopy(CONFLICT_DOC)
    if 422 not in documented and "arguments" not in apidoc:  # a body's 422 is documented with it
        manual.setdefault("responses", {})["422"] = copy.deepcopy(INVALID_KEY_DOC)
    wrapper.__dict__["_apidoc"] = apidoc
