"""Training runs: submit one, read its status, list a user's runs, cancel one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict

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
from schemas.jobs import tokenizer_key
from schemas.models import MODEL_FAMILIES, model_shape
from schemas.runs import TERMINAL_STATUSES, RunRecord
from trainer_api.corpora import chosen_corpus
from trainer_api.services import Services, run_or_404, services
from trainer_tasks.app import TRAIN_TASK

blp = Blueprint("runs", __name__, url_prefix="/runs", description="Training runs")


@blp.route("/train", methods=["POST"])
@blp.arguments(TrainRequestSchema)
@blp.response(202, TrainAcceptedSchema)
def submit_training(body: Mapping[str, object]) -> dict[str, str]:
    """Record a training run and queue it; answers its run_id and the Celery job_id."""
    found = services()
    corpus, problems = chosen_corpus(body, found)
    request = TrainRequest.from_mapping({**body, "corpus_path": str(corpus or "")})
    problems.update(request_problems(request, found))
    if problems:
        abort(422, errors={"json": problems})
    run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    found.store.create(
        run_id=run_id, job_id=job_id, user_id=request.user_id, request=request.to_mapping(), now=time.time()
    )
    try:
        found.dispatch(TRAIN_TASK, [run_id], job_id)
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
    return status_body(run_or_404(run_id))


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


def request_problems(request: TrainRequest, found: Services) -> dict[str, list[str]]:
    """Checks that depend on configuration or stored state, so they cannot live in the static schema."""
    settings = found.settings
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
    if not tokenizer_ready(request.tokenizer_id, found):
        problems["tokenizer_id"] = [
            f"unknown tokenizer {request.tokenizer_id!r}, or not ready yet; "
            'use "auto" or a completed tokenizer'
        ]
    return problems


def tokenizer_ready(tokenizer_id: str, found: Services) -> bool:
    """ "auto", or a tokenizer whose training has completed."""
    if tokenizer_id == "auto":
        return True
    record = found.jobs.get(tokenizer_key(tokenizer_id))
    return record is not None and record.status == "completed"
