"""The queues live workers consume: their workers and how many tasks wait, from the registry and broker."""

from __future__ import annotations

import time
from dataclasses import asdict

from flask_smorest import Blueprint

from schemas.api import QueueListSchema
from schemas.queues import broker_lists
from trainer_api.services import services

blp = Blueprint("queues", __name__, url_prefix="/queues", description="Queues and their workers")


@blp.route("", methods=["GET"])
@blp.response(200, QueueListSchema)
def list_queues() -> dict[str, object]:
    """Every queue a live worker consumes, with those workers and the queue's length in the broker."""
    found = services()
    workers = found.workers.live(time.time())
    names = sorted({queue for entry in workers for queue in entry.queues})
    with found.redis.pipeline(transaction=False) as pipe:
        for name in names:
            for key in broker_lists(name):
                pipe.llen(key)
        counts = pipe.execute()
    steps = len(broker_lists(""))
    return {
        "queues": [
            {
                "name": name,
                "length": sum(int(count) for count in counts[index * steps : (index + 1) * steps]),
                "workers": [asdict(entry) for entry in workers if name in entry.queues],
            }
            for index, name in enumerate(names)
        ]
    }
