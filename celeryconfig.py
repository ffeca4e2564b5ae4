"""Celery's one configuration: Redis broker and results, JSON only, one long training at a time."""

import os

from schemas.queues import LIGHT_QUEUE, NEW_TASK_PRIORITY, PRIORITY_STEPS, TRAINING_QUEUE
from trainer_store.settings import DEFAULT_REDIS_URL
from trainer_tasks.app import CANCEL_QUEUED_TASK, EVALUATE_TASK, TOKENIZER_TASK, TRAIN_TASK

broker_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
result_backend = broker_url
broker_connection_retry_on_startup = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Long tasks: acknowledge after the run, and send a run back to the queue when its pool process dies.
# The run record's lease keeps a second delivery from training it twice (it finds the lease and does
# nothing); the workers' periodic check sends a run whose lease expired back to its queue, and the
# attempt count ends a run that keeps killing its worker instead of looping forever.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = 1

# Redis redelivers unacknowledged messages after this long; runs may take hours, and a second
# delivery finds the lease (or the run ended) and returns. Runs whose worker died are found by the
# periodic check within 1.5 leases, not by this. A test sets it short to cause a redelivery.
VISIBILITY_TIMEOUT_S = float(os.environ.get("CELERY_VISIBILITY_TIMEOUT_S") or 12 * 3600)
visibility_timeout = VISIBILITY_TIMEOUT_S
# One Redis list per priority step: resumed runs go ahead of new ones (schemas.queues).
task_default_priority = NEW_TASK_PRIORITY
broker_transport_options = {
    "visibility_timeout": VISIBILITY_TIMEOUT_S,
    "priority_steps": list(PRIORITY_STEPS),
    # Each worker looks for messages past the visibility timeout this often (a scan of one sorted set),
    # every time rather than kombu's every tenth, so a short test timeout redelivers within seconds.
    "unacked_restore_interval": min(10.0, VISIBILITY_TIMEOUT_S / 3),
    "unacked_restore_throttle": 1,
}
result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}

# Flower reads task events.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# Tokenizer training and evaluation take seconds to minutes: their own queue and worker, so they
# never wait hours behind a training run.
task_default_queue = TRAINING_QUEUE
task_routes = {
    TRAIN_TASK: {"queue": TRAINING_QUEUE},
    TOKENIZER_TASK: {"queue": LIGHT_QUEUE},
    EVALUATE_TASK: {"queue": LIGHT_QUEUE},
    CANCEL_QUEUED_TASK: {"queue": LIGHT_QUEUE},
}

# A worker that loses its broker connection keeps training: the run's lease (renewed in Redis by its
# heartbeat) is what says who trains it, and the message is acknowledged after the run. Cancelling the
# task on a connection blip would throw away training that the lease still protects.
worker_cancel_long_running_tasks_on_connection_loss = False

worker_hijack_root_logger = False
# The Procfile's workers run with REMAP_SIGTERM=SIGQUIT, so a platform's SIGTERM starts a soft shutdown:
# a running task gets this long, then its pool process is stopped (the run checkpoints and goes back to
# the queue) instead of the worker waiting hours for the run to end.
worker_soft_shutdown_timeout = float(os.environ.get("WORKER_SOFT_SHUTDOWN_TIMEOUT_S") or 30)
