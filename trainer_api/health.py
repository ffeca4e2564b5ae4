"""Liveness and readiness probes."""

from __future__ import annotations

import logging

import redis
from flask_smorest import Blueprint, abort

from schemas.api import HealthSchema
from trainer_api.services import services
from trainer_store.storage import StoreUnavailable

log = logging.getLogger(__name__)

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
@blp.response(200, HealthSchema)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.response(200, HealthSchema)
def readyz() -> dict[str, str]:
    """Redis and the file store (each of its roots) answer; 503 naming what does not."""
    found = services()
    try:
        found.store.ping()
    except redis.RedisError:
        abort(503, message="Redis is unreachable")
    files = found.files
    for storage in (files.corpora, files.artifacts, files.runs):
        try:
            storage.ping()
        except StoreUnavailable as exc:
            # The probe needs no key: where the store is and why it failed go to the log only.
            log.warning("not ready: %s", exc)
            abort(503, message="the file store is unreachable")
    return {"status": "ready", "redis": "ok", "store": "ok"}
