"""The HTTP API: validates requests, records runs and jobs, dispatches Celery tasks, serves artifacts."""

from __future__ import annotations

from flask import Flask

from trainer_api import (
    artifacts,
    context,
    corpora,
    docs,
    evaluations,
    events,
    health,
    links,
    logs,
    metrics,
    models,
    queues,
    runs,
    tokenizers,
)
from trainer_api.errors import TrainerApi
from trainer_api.services import EXTENSION, Dispatch, build, send_task
from trainer_store.settings import Settings


def create_app(settings: Settings | None = None, dispatch: Dispatch = send_task) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        API_TITLE="trainer",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=docs.ASSETS_URL,
        # No badge from the public validator: the page works without internet access.
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        TRAINER_API_KEY=settings.api_key,
        TRAINER_METRICS_TOKEN=settings.metrics_token,
        TRAINER_STREAM_URL=settings.stream_url,
    )
    app.extensions[EXTENSION] = build(settings, dispatch)
    metrics.install(app)
    context.install(app, upload_limits={corpora.UPLOAD_ENDPOINT: corpora.upload_body_limit(settings)})
    api = TrainerApi(app)
    api.register_blueprint(health.blp)
    api.register_blueprint(runs.blp)
    api.register_blueprint(queues.blp)
    api.register_blueprint(models.blp)
    api.register_blueprint(corpora.blp)
    api.register_blueprint(tokenizers.blp)
    api.register_blueprint(artifacts.blp)
    api.register_blueprint(evaluations.blp)
    api.register_blueprint(logs.blp)
    api.register_blueprint(events.blp)
    api.register_blueprint(metrics.blp)
    app.register_blueprint(docs.assets)
    api.register_blueprint(links.blp)
    return app
