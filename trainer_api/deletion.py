"""Deleting what the service keeps, only once no queued or running work needs it."""

from __future__ import annotations

from flask_smorest import abort

from schemas.status import TERMINAL_STATUSES
from trainer_api.services import Services
from trainer_store.cleanup import remove_run_files
from trainer_store.jobs import evaluation_key
from trainer_store.runs import Retirement, RunRecord


def delete_run(found: Services, record: RunRecord) -> None:
    """Remove a finished run's files, then its keys; 409 while it or an evaluation of it is under way."""
    run_id = record.run_id
    if not record.is_terminal:
        abort(
            409,
            message=(
                f"run {run_id!r} is {record.status}; cancel it (POST /runs/{run_id}/cancel) "
                "and delete it once it has ended"
            ),
        )
    evaluation = found.jobs.get(evaluation_key(run_id))
    if evaluation is not None and evaluation.status not in TERMINAL_STATUSES:
        abort(
            409, message=f"an evaluation of run {run_id!r} is {evaluation.status}; delete it once that ends"
        )
    # Files first: if the store fails, the record is still there and the delete can be tried again.
    remove_run_files(found.files, found.redis, run_id)
    found.store.delete(record)


def retire_or_abort(retirement: Retirement, what: str) -> None:
    """Go on only when the corpus or tokenizer is marked for deletion; 404 or 409 otherwise."""
    if retirement.outcome == "missing":
        abort(404, message=f"no {what}")
    if retirement.outcome == "busy":
        abort(409, message=f"{what} is still {retirement.status}; delete it once it has finished")
    if retirement.outcome == "in-use":
        abort(
            409,
            message=(
                f"{what} is used by {retirement.active_runs} queued or running run(s); "
                "delete it once they have finished"
            ),
        )
