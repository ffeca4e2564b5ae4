"""The Celery queues runs and jobs go to: names every process agrees on."""

from __future__ import annotations

# Training runs go here unless a request names another queue a worker consumes.
TRAINING_QUEUE = "training"
# A request for accelerator "gpu" goes here unless it names another queue (the Procfile's gpu_worker).
GPU_QUEUE = "gpu"
# Tokenizer training and evaluation: seconds to minutes, never behind a training run.
LIGHT_QUEUE = "light"
# A queue's name as a request may give it: it becomes part of Redis key names.
QUEUE_NAME = r"^[A-Za-z0-9_.-]{1,64}$"

# Runs handed back or found abandoned go ahead of runs that never started: the broker keeps one list
# per priority step and a worker takes from the lowest step first, so those are sent at
# RESUMED_PRIORITY and every other task at NEW_TASK_PRIORITY.
PRIORITY_STEPS = (0, 3, 6, 9)
RESUMED_PRIORITY = 0
NEW_TASK_PRIORITY = 6
# kombu's Redis transport keeps a queue's messages of priority step N (N > 0) in `<queue>\x06\x16N`.
PRIORITY_SEPARATOR = "\x06\x16"


def broker_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting tasks, one per priority step, the first taken first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]
