"""BPE tokenizers trained on a corpus by the worker's light queue: request one, read its status, delete it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from flask_smorest import Blueprint, abort

from schemas.api import (
    ErrorSchema,
    TokenizerAcceptedSchema,
    TokenizerRequestSchema,
    TokenizerStatusSchema,
)
from trainer_api.corpora import chosen_corpus
from trainer_api.deletion import retire_or_abort
from trainer_api.idempotency import idempotent
from trainer_api.results import integer_or_none, number_or_none, text_or_none
from trainer_api.services import Services, dispatch_job, services
from trainer_store.jobs import JobRecord, tokenizer_key
from trainer_store.records import is_record_id
from trainer_store.storage import safe_key
from trainer_tasks.app import TOKENIZER_TASK

blp = Blueprint("tokenizers", __name__, url_prefix="/tokenizers", description="BPE tokenizers")

TOKENIZER_SETTINGS = ("method", "vocab_size", "min_frequency", "holdout_fraction")


@blp.route("/train", methods=["POST"])
@idempotent
@blp.arguments(TokenizerRequestSchema())
@blp.response(202, TokenizerAcceptedSchema)
def train_tokenizer(body: Mapping[str, object]) -> dict[str, str]:
    """Record a tokenizer job and queue it; answers its tokenizer_id and the Celery job_id."""
    found = services()
    corpus, problems = chosen_corpus(body, found)
    if problems:
        abort(422, errors={"json": problems})
    request: dict[str, object] = {name: body[name] for name in TOKENIZER_SETTINGS}
    request.update(corpus_path=corpus, corpus_id=body.get("corpus_id"))
    tokenizer_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    key = tokenizer_key(tokenizer_id)
    found.jobs.create(key, request, time.time())
    dispatch_job(found, key, TOKENIZER_TASK, [tokenizer_id], job_id)
    return {"tokenizer_id": tokenizer_id, "job_id": job_id}


@blp.route("/<string:tokenizer_id>")
@blp.response(200, TokenizerStatusSchema)
@blp.alt_response(404, schema=ErrorSchema, description="No such tokenizer.")
def tokenizer_status(tokenizer_id: str) -> dict[str, object]:
    """Status; stats and artifact_path once the worker has completed it."""
    record = tokenizer_record(services(), tokenizer_id)
    if record is None:
        abort(404, message=f"no tokenizer {tokenizer_id!r}")
    assert record is not None
    result = record.result if record.status == "completed" else None
    return {
        "tokenizer_id": tokenizer_id,
        "status": record.status,
        "message": record.message,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "stats": tokenizer_stats(result),
        "artifact_path": text_or_none(result, "artifact_path"),
    }


@blp.route("/<string:tokenizer_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(404, schema=ErrorSchema, description="No such tokenizer.")
@blp.alt_response(
    409,
    schema=ErrorSchema,
    description="The tokenizer is still training, or a queued or running run uses it.",
)
def delete_tokenizer(tokenizer_id: str) -> None:
    """Delete a tokenizer and its files; runs that used it keep their own copy in their model folder."""
    found = services()
    retire_or_abort(found.store.retire_tokenizer(tokenizer_id), f"tokenizer {tokenizer_id!r}")
    found.artifact_files.remove(safe_key("tokenizers", tokenizer_id))
    found.jobs.delete(tokenizer_key(tokenizer_id))


def tokenizer_record(found: Services, tokenizer_id: str) -> JobRecord | None:
    """The tokenizer's job record; None for an unknown id (or one that cannot name a record)."""
    return found.jobs.get(tokenizer_key(tokenizer_id)) if is_record_id(tokenizer_id) else None


def tokenizer_stats(result: Mapping[str, object] | None) -> dict[str, object] | None:
    """The worker's measurements; a value it did not write (or wrote mistyped) answers null."""
    if result is None:
        return None
    return {
        "vocab_size": integer_or_none(result, "vocab_size"),
        "tokens_per_char": number_or_none(result, "tokens_per_char"),
        "multibyte_coverage": number_or_none(result, "multibyte_coverage"),
    }
