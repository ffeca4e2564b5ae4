"""Evaluating a completed run on its validation or test split: request one, read the latest."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from flask_smorest import Blueprint, abort

from schemas.api import (
    ErrorSchema,
    EvaluateRequestSchema,
    EvaluationAcceptedSchema,
    EvaluationStatusSchema,
)
from trainer_api.results import number_or_none, text_or_none
from trainer_api.services import dispatch_job, run_or_404, services
from trainer_store.jobs import evaluation_key
from trainer_store.runs import RunRecord
from trainer_tasks.app import EVALUATE_TASK

blp = Blueprint("evaluations", __name__, url_prefix="/runs", description="Evaluating trained runs")

ACTIVE_JOB_STATUSES = ("queued", "running")


@blp.route("/<string:run_id>/evaluate", methods=["POST"])
@blp.arguments(EvaluateRequestSchema())
@blp.response(202, EvaluationAcceptedSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run.")
@blp.alt_response(
    409, schema=ErrorSchema, description="The run has not completed, or an evaluation is under way."
)
def evaluate_run(body: Mapping[str, object], run_id: str) -> dict[str, str]:
    """Queue an evaluation of the run's final model; it replaces the run's previous evaluation."""
    found = services()
    run = run_or_404(run_id)
    split = str(body["split"])
    if split == "test" and not has_test_split(run):
        abort(422, errors={"json": {"split": ["the run was trained without a test split (test_fraction 0)"]}})
    if run.status != "completed":
        abort(409, message=f"run {run_id!r} is {run.status}; only a completed run can be evaluated")
    key = evaluation_key(run_id)
    previous = found.jobs.get(key)
    # Two evaluations of one run would race to write the same record.
    if previous is not None and previous.status in ACTIVE_JOB_STATUSES:
        abort(409, message=f"an evaluation of run {run_id!r} is already {previous.status}")
    job_id = uuid.uuid4().hex
    found.jobs.create(key, {"split": split}, time.time())
    dispatch_job(found, key, EVALUATE_TASK, [run_id, split], job_id)
    return {"run_id": run_id, "split": split, "job_id": job_id}


@blp.route("/<string:run_id>/eval")
@blp.response(200, EvaluationStatusSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such run, or it has not been evaluated.")
def evaluation_status(run_id: str) -> dict[str, object]:
    """The latest evaluation: status, and loss and perplexity once completed."""
    run_or_404(run_id)
    record = services().jobs.get(evaluation_key(run_id))
    if record is None:
        abort(404, message=f"run {run_id!r} has not been evaluated; POST /runs/{run_id}/evaluate")
    assert record is not None
    result = record.result if record.status == "completed" else None
    return {
        "run_id": run_id,
        "split": text_or_none(record.request, "split"),
        "status": record.status,
        "message": record.message,
        "loss": number_or_none(result, "loss"),
        "perplexity": number_or_none(result, "perplexity"),
        "created_at": record.created_at,
        "finished_at": record.finished_at,
    }


def has_test_split(run: RunRecord) -> bool:
    fraction = number_or_none(run.request, "test_fraction")
    return fraction is not None and fraction > 0
