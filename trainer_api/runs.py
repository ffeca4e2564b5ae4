"""Training runs: submit one, read its status, list a user's runs, cancel one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

from flask_smorest import Blueprint, abort
from marshmallow import RAISE

from schemas.api import (
    CancelAcceptedSchema,
    RunListQuery,
    RunListQuerySchema,
    RunListSchema,
    RunStatusSchema,
    TrainAcceptedSchema,
    TrainRequest,
    TrainRequestSchema,
)
from schemas.models import MODEL_FAMILIES, model_shape
from schemas.runs import TERMINAL_STATUSES, RunRecord
from schemas.settings import Settings
from trainer_api.services import services

blp = Blueprint("runs", __name__, url_prefix="/runs", description="Training runs")


@blp.route("/train", methods=["POST"])
@blp.arguments(TrainRequestSchema)
@blp.response(202, TrainAcceptedSchema)
def submit_training(body: Mapping[str, object]) -> dict[str, str]:
    """Record a training run and queue it; answers its run_id and the Celery job_id."""
    found = services()
    request = TrainRequest.from_mapping(body)
    problems = request_problems(request, found.settings)
    corpus = resolve_corpus(found.settings.corpus_root, request.corpus_path)
    if corpus is None:
        problems["corpus_path"] = ["must name an existing file inside the corpus root"]
    if problems:
        abort(422, errors={"json": problems})
    assert corpus is not None  # problems is empty, so the corpus resolved
    request = replace(request, corpus_path=str(corpus))
    run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    found.store.create(
        run_id=run_id, job_id=job_id, user_id=request.user_id, request=request.to_mapping(), now=time.time()
    )
    try:
        found.dispatch(run_id, job_id)
    except Exception:
        found.store.transition(
            run_id,
            ("queued",),
            "failed",
            {
                "message": "could not queue the run; nothing was trained",
                "error_kind": "system",
                "finished_at": time.time(),
            },
        )
        raise
    return {"run_id": run_id, "job_id": job_id}


@blp.route("/<string:run_id>")
@blp.response(200, RunStatusSchema)
def run_status(run_id: str) -> dict[str, object]:
    """The run's status from its record; `last_heartbeat_ts` is null until a worker starts it."""
    record = services().store.get(run_id)
    if record is None:
        abort(404, message=f"no run {run_id!r}")
    assert record is not None
    return status_body(record)


@blp.route("", methods=["GET"])
# webargs ignores unknown query fields unless told otherwise; the contract answers them with 422.
@blp.arguments(RunListQuerySchema, location="query", unknown=RAISE)
@blp.response(200, RunListSchema)
def list_runs(query: RunListQuery) -> dict[str, object]:
    """A user's runs, newest first (at most `limit`, 20 by default, 100 at most)."""
    records = services().store.list_for_user(query.user_id, query.limit)
    return {"runs": [status_body(record) for record in records]}


@blp.route("/<string:run_id>/cancel", methods=["POST"])
@blp.response(202, CancelAcceptedSchema)
def cancel_run(run_id: str) -> dict[str, str]:
    """Ask a queued or running run to stop; the worker ends it `canceled` within a heartbeat or two."""
    found = services().store.request_cancel(run_id)
    if found is None:
        abort(404, message=f"no run {run_id!r}")
    if found in TERMINAL_STATUSES:
        abort(409, message=f"run {run_id!r} has already ended ({found}); there is nothing to cancel")
    return {"status": "cancellation-requested"}


def status_body(record: RunRecord) -> dict[str, object]:
    body = asdict(record)
    for internal in ("request", "cancel_requested", "last_seq"):
        body.pop(internal)
    return body


def request_problems(request: TrainRequest, settings: Settings) -> dict[str, list[str]]:
    """Checks that depend on configuration, so they cannot live in the static schema."""
    problems: dict[str, list[str]] = {}
    if request.model_family not in MODEL_FAMILIES:
        problems["model_family"] = [f"must be one of {sorted(MODEL_FAMILIES)}"]
    elif model_shape(request.model_family, request.model_size) is None:
        problems["model_size"] = [f"must be one of {sorted(MODEL_FAMILIES[request.model_family])}"]
    limits = {
        "num_epochs": (request.num_epochs, settings.max_epochs),
        "max_seq_len": (request.max_seq_len, settings.max_seq_len),
        "batch_size": (request.batch_size, settings.max_batch_size),
    }
    for name, (value, limit) in limits.items():
        if value > limit:
            problems[name] = [f"must be at most {limit}"]
    if request.tokenizer_id != "auto":
        problems["tokenizer_id"] = [f'unknown tokenizer {request.tokenizer_id!r}; use "auto"']
    return problems


def resolve_corpus(root: Path, value: str) -> Path | None:
    """The corpus file inside `root`, absolute or relative to it; None for anything that leads out."""
    base = root.resolve()
    candidate = Path(value)
    try:
        # resolve() follows symlinks, so a link that points outside the root is caught here too.
        resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
        inside = resolved.is_relative_to(base) and resolved.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem
        return None
    return resolved if inside else None
