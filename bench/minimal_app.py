"""The floor of this stack: a flask-smorest app that validates the train body, writes one Redis hash and
sends one Celery task, and nothing else (no caps, records, idempotency, metrics or request ids)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping

import redis
from flask import Flask
from flask_smorest import Api, Blueprint

from schemas.api import TrainAcceptedSchema, TrainRequestSchema
from schemas.queues import TRAINING_QUEUE
from trainer_tasks.app import TRAIN_TASK, celery_app

blp = Blueprint("runs", __name__, url_prefix="/runs")
client = redis.Redis.from_url(os.environ["REDIS_URL"])


@blp.route("/train", methods=["POST"])
@blp.arguments(TrainRequestSchema)
@blp.response(202, TrainAcceptedSchema)
def submit(body: Mapping[str, object]) -> dict[str, str]:
    run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    client.hset(f"bench:runs:{run_id}", mapping={"status": "queued", "created_at": time.time()})
    celery_app.send_task(TRAIN_TASK, args=[run_id], task_id=job_id, queue=TRAINING_QUEUE, ignore_result=True)
    return {"run_id": run_id, "job_id": job_id}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(API_TITLE="minimal", API_VERSION="v1", OPENAPI_VERSION="3.0.3")
    Api(app).register_blueprint(blp)
    return app
