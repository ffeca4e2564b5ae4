"""Training runs: submit one, read its status, list a user's runs, cancel one."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict

from flask_smorest import Blueprint, abort
from marshmallow import RAISE

from schemas.api import (
    CancelAcceptedSchema,
    ErrorSchema,
    RunListQuery,
    RunListQuerySchema,
    RunListSchema,
    RunStatusSchema,
    TrainAcceptedSchema,
    TrainRequest,
    TrainRequestSchema,
)
from schemas.models import MODEL_FAMILIES, model_shape
from schemas.queues import LIGHT_QUEUE
from schemas.status import TERMINAL_STATUSES
from trainer_api.corpora import chosen_corpus
from trainer_api.deletion import delete_run
from trainer_api.errors import UNAVAILABLE_ERRORS
from trainer_api.idempotency import idempotent
from trainer_api.limits import RETRY_AFTER_DOC, admit_run
from trainer_api.services import Services, Task, run_or_404, services
from trainer_api.tokenizers import tokenizer_record
from trainer_store.runs import RunRecord, RunStore
from trainer_tasks.app import CANCEL_QUEUED_TASK

log = logging.getLogger(__name__)
blp = Blueprint("runs", __name__, url_prefix="/runs", description="Training runs")


@blp.route("/train", methods=["POST"])
@idempotent
@blp.arguments(TrainRequestSchema())
@blp.response(202, TrainAcceptedSchema)
@blp.alt_response(
    429,
    schema=ErrorSchema,
    description="The user has APP__MAX_ACTIVE_RUNS_PER_USER runs queued or running already.",
    headers=RETRY_AFTER_DOC,
)
@blp.alt_response(
    503,
    schema=ErrorSchema,
    description="APP__MAX_QUEUED_RUNS runs are queued already, or Redis or the broker is unavailable.",
    headers=RETRY_AFTER_DOC,
)
def submit_training(body: Mapping[str, object]) -> dict[str, str]:
    """Record a training run and queue it; answers its run_id and the Celery job_id."""
    found = services()
    corpus, problems = chosen_corpus(body, found)
    request = TrainRequest.from_mapping({**body, "corpus_path": corpus or ""})
    problems.update(request_problems(request, found))
    if problems:
        abort(422, errors={"json": problems})
    return admit_run(found, request)


@blp.route("/<string:run_id>/retry", methods=["POST"])
@idempotent
@blp.response(202, TrainAcceptedSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
@blp.alt_response(
    409, schema=ErrorSchema, description="The run's request no longer holds (its corpus is gone)."
)
@blp.alt_response(
    429,
    schema=ErrorSchema,
    description="The user has APP__MAX_ACTIVE_RUNS_PER_USER runs queued or running already.",
    headers=RETRY_AFTER_DOC,
)
@blp.alt_response(
    503,
    schema=ErrorSchema,
    description="APP__MAX_QUEUED_RUNS runs are queued already, or Redis or the broker is unavailable.",
    headers=RETRY_AFTER_DOC,
)
def retry_run(run_id: str) -> dict[str, str]:
    """A new run with the same request and owner as this one; answers the new run_id and job_id."""
    found = services()
    request = TrainRequest.from_mapping(run_or_404(run_id).request)
    problems = request_problems(request, found)
    if request.corpus_id is not None and found.corpora.get(request.corpus_id) is None:
        problems["corpus_id"] = [f"corpus {request.corpus_id!r} has been deleted"]
    if problems:
        listed = "; ".join(f"{name}: {' '.join(texts)}" for name, texts in sorted(problems.items()))
        abort(409, message=f"run {run_id!r} cannot be trained again as it was: {listed}")
    return admit_run(found, request)


@blp.route("/<string:run_id>")
@blp.response(200, RunStatusSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
def run_status(run_id: str) -> dict[str, object]:
    """The run's status from its record; `last_heartbeat_ts` is null until a worker starts it."""
    return status_body(run_or_404(run_id), services().store)


@blp.route("/<string:run_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
@blp.alt_response(
    409, schema=ErrorSchema, description="The run, or an evaluation of it, is queued or running."
)
def remove_run(run_id: str) -> None:
    """Delete a finished run: its record, evaluation, log, events, working files and model."""
    delete_run(services(), run_or_404(run_id))


@blp.route("", methods=["GET"])
# webargs ignores unknown query fields unless told otherwise; the contract answers them with 422.
@blp.arguments(RunListQuerySchema(), location="query", unknown=RAISE)
@blp.response(200, RunListSchema)
def list_runs(query: RunListQuery) -> dict[str, object]:
    """A user's runs, newest first (at most `limit`, 20 by default, 100 at most)."""
    store = services().store
    return {
        "runs": [status_body(record, store) for record in store.list_for_user(query.user_id, query.limit)]
    }


@blp.route("/<string:run_id>/cancel", methods=["POST"])
@blp.response(202, CancelAcceptedSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
@blp.alt_response(409, schema=ErrorSchema, description="The run has ended already.")
def cancel_run(run_id: str) -> dict[str, str]:
    """Ask a queued or running run to stop: a queued one ends `canceled` at once (the light queue does it),
    a running one within a heartbeat or two."""
    found = services()
    status = found.store.request_cancel(run_id)
    if status is None:
        abort(404, message=f"no run {run_id!r}")
    if status in TERMINAL_STATUSES:
        abort(409, message=f"run {run_id!r} has already ended ({status}); there is nothing to cancel")
    if status == "queued":
        _end_queued_run_now(found, run_id)
    return {"status": "cancellation-requested"}


def _end_queued_run_now(found: Services, run_id: str) -> None:
    """Ask the light queue to end a flagged queued run; without a broker, the worker that takes it will."""
    try:
        found.dispatch(Task(CANCEL_QUEUED_TASK, [run_id], uuid.uuid4().hex))
    except UNAVAILABLE_ERRORS as exc:
        # The flag is what cancels: the cancel stands, it only ends when a worker takes the run.
        log.warning("run %s: cancel recorded; the light queue could not be told (%s)", run_id, exc)


def status_body(record: RunRecord, store: RunStore) -> dict[str, object]:
    body = asdict(record)
    for internal in ("request", "cancel_requested", "last_seq", "train_s", "attempt_started_at"):
        body.pop(internal)
    body["queue_position"] = store.queue_position(record)
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
    if not settings.allow_offline_queues:
        live = found.live_queues.including(request.queue, time.time())
        if request.queue not in live:
            problems["queue"] = [
                f"no live worker consumes queue {request.queue!r}; live queues: "
                + (", ".join(queue for queue in live if queue != LIGHT_QUEUE) or "none")
            ]
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
    record = tokenizer_record(found, tokenizer_id)
    return record is not None and record.status == "completed"
