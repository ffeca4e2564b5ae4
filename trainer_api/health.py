"""Liveness and readiness probes."""

from __future__ import annotations

import redis
from flask_smorest import Blueprint, abort

from schemas.api import HealthSchema
from trainer_api.services import services

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
@blp.response(200, HealthSchema)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.response(200, HealthSchema)
def readyz() -> dict[str, str]:
    """Redis answers; 503 otherwise."""
    try:
        services().store.ping()
    except redis.RedisError:
        abort(503, message="Redis is unreachable")
    return {"status": "ready"}
