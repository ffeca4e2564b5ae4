"""Each task the API sends lands on its own queue's list in Redis, with no worker there to take it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

import celeryconfig
from schemas.queues import LIGHT_QUEUE, RESUMED_PRIORITY, TRAINING_QUEUE, broker_lists
from tests.conftest import celery_on
from trainer_api.services import Task, sender
from trainer_tasks.app import CANCEL_QUEUED_TASK, EVALUATE_TASK, TOKENIZER_TASK, TRAIN_TASK, celery_app

# A database no test worker consumes from: whatever is sent stays on its queue's list.
QUIET_DB = 5


@pytest.fixture
def quiet_redis(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    url = redis_url.rsplit("/", 1)[0] + f"/{QUIET_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def queued(client: redis.Redis, queue: str) -> list[tuple[str, str]]:
    """(task name, task id) of each message waiting on a queue, in the order a worker takes them."""
    found = []
    for name in broker_lists(queue):
        for raw in reversed(client.lrange(name, 0, -1)):
            headers = json.loads(raw)["headers"]
            found.append((headers["task"], headers["id"]))
    return found


def test_routes_name_the_tasks_by_their_constants() -> None:
    assert celeryconfig.task_routes == {
        TRAIN_TASK: {"queue": TRAINING_QUEUE},
        TOKENIZER_TASK: {"queue": LIGHT_QUEUE},
        EVALUATE_TASK: {"queue": LIGHT_QUEUE},
        CANCEL_QUEUED_TASK: {"queue": LIGHT_QUEUE},
    }
    assert celery_app.conf.task_routes == celeryconfig.task_routes
    assert set(celery_app.conf.task_routes) <= set(celery_app.tasks), "every route names a real task"


def test_each_task_lands_on_its_queue(quiet_redis: tuple[str, redis.Redis]) -> None:
    url, client = quiet_redis
    broker = celery_on(url)
    send = sender(broker)
    send(Task(TRAIN_TASK, ["run-1"], "job-train"))
    send(Task(TOKENIZER_TASK, ["tok-1"], "job-tokenizer"))
    send(Task(EVALUATE_TASK, ["run-1", "validation"], "job-eval"))
    send(Task(TRAIN_TASK, ["run-2"], "job-gpu", queue="gpu"))
    # A run that goes back to its queue is sent ahead of those that never started.
    broker.send_task(TRAIN_TASK, args=["run-3"], task_id="job-resumed", priority=RESUMED_PRIORITY)

    assert queued(client, "training") == [(TRAIN_TASK, "job-resumed"), (TRAIN_TASK, "job-train")]
    assert queued(client, "gpu") == [(TRAIN_TASK, "job-gpu")]
    assert queued(client, "light") == [(TOKENIZER_TASK, "job-tokenizer"), (EVALUATE_TASK, "job-eval")]
    assert not client.exists("celery"), "nothing went to Celery's default queue"
    assert not client.keys("celery-task-meta-*"), "no result was asked for"
    broker.close()


def test_a_task_is_sent_with_its_task_sent_event(quiet_redis: tuple[str, redis.Redis]) -> None:
    """One batch holds both: the task on its queue and, for Flower, the event that says it was sent."""
    url, client = quiet_redis
    broker = celery_on(url)
    with broker.producer_or_acquire() as producer:
        # kombu sends each message alone, silently, under transport options that could replay a pipeline
        # (retry_on_timeout, retry): celeryconfig must set none of them.
        assert producer.channel.supports_batch_publish, "the broker's channel would not batch"
    events = client.pubsub()
    events.psubscribe(f"/{QUIET_DB}.celeryev/*")
    subscribed = events.get_message(timeout=5)
    assert subscribed is not None, "not subscribed"
    assert subscribed["type"] == "psubscribe"
    sender(broker)(Task(TRAIN_TASK, ["run-1"], "job-sent"))

    message = events.get_message(timeout=5)
    assert message is not None, "no task-sent event"
    envelope = json.loads(message["data"])
    event = json.loads(base64.b64decode(envelope["body"]))
    assert (event["type"], event["uuid"], event["name"], event["queue"]) == (
        "task-sent",
        "job-sent",
        TRAIN_TASK,
        TRAINING_QUEUE,
    )
    assert queued(client, TRAINING_QUEUE) == [(TRAIN_TASK, "job-sent")]
    events.close()
    broker.close()
