"""Cancel through every real part: gunicorn, Redis, a Celery worker training with Lightning."""

from __future__ import annotations

import redis
import requests

from schemas.events import TrainFailed, TrainProgress
from tests.conftest import Stack
from tests.test_end_to_end import SNOWFLAKE, events_until_terminal, submit


def test_a_running_run_is_canceled_and_ends_canceled(stack: Stack, subscriber: redis.client.PubSub) -> None:
    run_id = submit(stack, num_epochs=50)
    # Wait until it trains: the first progress event.
    while True:
        message = subscriber.get_message(ignore_subscribe_messages=True, timeout=60.0)
        assert message is not None, "no progress within a minute"
        if run_id.encode() in message["data"] and b"progress" in message["data"]:
            break

    response = requests.post(f"{stack.api_url}/runs/{run_id}/cancel", timeout=10)
    assert response.status_code == 202
    assert response.json() == {"status": "cancellation-requested"}

    events = events_until_terminal(subscriber, run_id, timeout_s=60)
    ended = events[-1]
    assert isinstance(ended, TrainFailed)
    assert (ended.status, ended.error_kind) == ("canceled", "user")
    progress = [e for e in events if isinstance(e, TrainProgress)]
    assert all(p.epoch < 50 for p in progress), "it stopped long before the last epoch"
    status = requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()
    assert status["status"] == "canceled"
    listed = requests.get(
        f"{stack.api_url}/runs", params={"user_id": SNOWFLAKE, "limit": 1}, timeout=10
    ).json()
    assert [run["run_id"] for run in listed["runs"]] == [run_id]
    again = requests.post(f"{stack.api_url}/runs/{run_id}/cancel", timeout=10)
    assert again.status_code == 409
    assert again.json()["code"] == "CONFLICT"
