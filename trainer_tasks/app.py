"""The one Celery app, configured from `celeryconfig`; torch-free so the API can send tasks by name."""

from celery import Celery

TRAIN_TASK = "trainer.train"
TOKENIZER_TASK = "trainer.tokenizer.train"
EVALUATE_TASK = "trainer.evaluate"

celery_app = Celery("trainer", include=["trainer_tasks.tasks"])
celery_app.config_from_object("celeryconfig")
app = celery_app  # the name `celery --app trainer_tasks.app` looks up
