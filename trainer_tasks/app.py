"""The one Celery app, configured from `celeryconfig`; torch-free so the API can send tasks by name."""

from celery import Celery

from trainer_tasks.maintenance import MaintenanceStep
from trainer_tasks.registry import RegistryStep

TRAIN_TASK = "trainer.train"
TOKENIZER_TASK = "trainer.tokenizer.train"
EVALUATE_TASK = "trainer.evaluate"
CANCEL_QUEUED_TASK = "trainer.cancel_queued"

celery_app = Celery("trainer", include=["trainer_tasks.tasks"])
celery_app.config_from_object("celeryconfig")
# Each worker's main process runs the periodic checks (one worker at a time).
celery_app.steps["worker"].add(MaintenanceStep)
# ... and keeps this worker in the registry the API reads (GET /queues, admitting runs).
celery_app.steps["worker"].add(RegistryStep)
app = celery_app  # the name `celery --app trainer_tasks.app` looks up
