"""The Celery worker: training tasks and the events they publish."""
