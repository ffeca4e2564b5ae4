"""Celery's one configuration: Redis broker and results, JSON only, one long training at a time."""

import os

from schemas.settings import DEFAULT_REDIS_URL

broker_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
result_backend = broker_url
broker_connection_retry_on_startup = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Long tasks: acknowledge after the run, and send a run back to the queue when its pool process dies.
# The run record's lease keeps a second delivery from training it twice, and its attempt count ends
# a run that keeps killing its worker instead of looping forever.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = 1

# Redis redelivers unacknowledged messages after this long; runs may take hours, and a second
# delivery finds the lease and returns, so this bounds only how late a lost run comes back.
VISIBILITY_TIMEOUT_S = 12 * 3600
visibility_timeout = VISIBILITY_TIMEOUT_S
broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}

# Flower reads task events.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# Tokenizer training and evaluation take seconds to minutes: their own queue and worker, so they
# never wait hours behind a training run.
TRAINING_QUEUE = "training"
LIGHT_QUEUE = "light"
task_default_queue = TRAINING_QUEUE
task_routes = {
    "trainer.train": {"queue": TRAINING_QUEUE},
    "trainer.tokenizer.train": {"queue": LIGHT_QUEUE},
    "trainer.evaluate": {"queue": LIGHT_QUEUE},
}

worker_hijack_root_logger = False
# The Procfile's workers run with REMAP_SIGTERM=SIGQUIT, so a platform's SIGTERM starts a soft shutdown:
# a running task gets this long, then its pool process is stopped (the run checkpoints and goes back to
# the queue) instead of the worker waiting hours for the run to end.
worker_soft_shutdown_timeout = float(os.environ.get("WORKER_SOFT_SHUTDOWN_TIMEOUT_S") or 30)
