"""Each queue's order: runs that never started by creation, runs handed back ahead of them; positions."""

from __future__ import annotations

import redis
from flask.testing import FlaskClient

from tests.conftest import DispatchRecorder
from tests.test_api import field_errors, json_of, submit, valid_body
from trainer_store.records import text
from trainer_store.runs import RunStore, queue_waiting_key


def create(store: RunStore, run_id: str, now: float, queue: str = "training") -> None:
    store.create(run_id=run_id, job_id=f"job-{run_id}", user_id=0, request={}, now=now, queue=queue)


def waiting(client: redis.Redis, queue: str = "training") -> list[str]:
    return [text(member) for member in client.zrange(queue_waiting_key(queue), 0, -1)]


def positions(store: RunStore, *run_ids: str) -> list[int | None]:
    found = [store.get(run_id) for run_id in run_ids]
    return [store.queue_position(record) if record else None for record in found]


def test_new_runs_wait_in_creation_order_per_queue(redis_client: redis.Redis) -> None:
    store = RunStore(redis_client)
    create(store, "first", 10.0)
    create(store, "gpu-run", 11.0, queue="gpu")
    create(store, "second", 12.0)
    assert waiting(redis_client) == ["first", "second"]
    assert waiting(redis_client, "gpu") == ["gpu-run"]
    assert positions(store, "first", "second", "gpu-run") == [1, 2, 1]
    record = store.get("gpu-run")
    assert record is not None
    assert record.queue == "gpu"


def test_a_run_leaves_its_queue_when_taken_and_comes_back_ahead_of_new_ones(
    redis_client: redis.Redis,
) -> None:
    store = RunStore(redis_client)
    for index, run_id in enumerate(("a", "b", "c")):
        create(store, run_id, 100.0 + index)
    assert store.claim("a", "worker-1", 60, 200.0)
    assert waiting(redis_client) == ["b", "c"]
    assert positions(store, "a", "b", "c") == [None, 1, 2]
    # A worker shutting down hands "a" back: it goes first, before runs that never started.
    assert store.hand_back("a", "requeued after a worker shutdown", now=300.0)
    assert waiting(redis_client) == ["a", "b", "c"]
    assert positions(store, "a", "b", "c") == [1, 2, 3]
    # Two runs handed back keep the order they came back in.
    assert store.claim("b", "worker-2", 60, 310.0)
    assert store.hand_back("b", "requeued after a worker shutdown", now=320.0)
    assert waiting(redis_client) == ["a", "b", "c"]


def test_a_queued_run_that_ends_leaves_its_queue(redis_client: redis.Redis) -> None:
    store = RunStore(redis_client)
    create(store, "doomed", 1.0)
    create(store, "kept", 2.0)
    assert store.transition("doomed", ("queued",), "canceled", {"message": "canceled"})
    assert waiting(redis_client) == ["kept"]
    assert positions(store, "doomed", "kept") == [None, 1]


def test_a_record_from_before_queues_reads_as_the_training_queue_with_no_position(
    redis_client: redis.Redis,
) -> None:
    redis_client.hset(
        "trainer:runs:old",
        mapping={"run_id": "old", "status": "queued", "user_id": 0, "created_at": 1.0, "request": "{}"},
    )
    store = RunStore(redis_client)
    record = store.get("old")
    assert record is not None
    assert record.queue == "training"
    assert store.queue_position(record) is None


def test_the_api_sends_a_run_to_its_queue_and_reports_its_position(
    client: FlaskClient, dispatched: DispatchRecorder
) -> None:
    first = json_of(submit(client, valid_body(user_id=0)))["run_id"]
    second = json_of(submit(client, valid_body(user_id=0, queue="gpu")))["run_id"]
    third = json_of(submit(client, valid_body(user_id=0)))["run_id"]
    assert [(task.args, task.queue) for task in dispatched.tasks] == [
        ([first], "training"),
        ([second], "gpu"),
        ([third], "training"),
    ]
    bodies = [json_of(client.get(f"/runs/{run_id}")) for run_id in (first, second, third)]
    assert [(body["queue"], body["queue_position"]) for body in bodies] == [
        ("training", 1),
        ("gpu", 1),
        ("training", 2),
    ]
    listed = json_of(client.get("/runs?user_id=0"))["runs"]
    assert isinstance(listed, list)
    assert [(run["run_id"], run["queue_position"]) for run in listed] == [(third, 2), (second, 1), (first, 1)]


def test_a_queue_name_must_be_plain_and_not_the_light_queue(client: FlaskClient) -> None:
    for bad in ("", "a b", "x" * 65, "trainer:evil", "light"):
        response = submit(client, valid_body(queue=bad))
        assert response.status_code == 422, bad
        assert set(field_errors(response)) == {"queue"}
    assert "light queue" in str(field_errors(submit(client, valid_body(queue="light")))["queue"])


def test_a_gpu_request_goes_to_the_gpu_queue_unless_it_names_another(
    client: FlaskClient, dispatched: DispatchRecorder, redis_client: redis.Redis
) -> None:
    gpu = json_of(submit(client, valid_body(user_id=0, accelerator="gpu", devices=1)))["run_id"]
    named = json_of(submit(client, valid_body(user_id=0, accelerator="gpu", queue="big-gpus")))["run_id"]
    cpu = json_of(submit(client, valid_body(user_id=0, accelerator="cpu")))["run_id"]
    assert [(task.args[0], task.queue) for task in dispatched.tasks] == [
        (gpu, "gpu"),
        (named, "big-gpus"),
        (cpu, "training"),
    ]
    record = RunStore(redis_client).get(str(gpu))
    assert record is not None
    assert (record.request["accelerator"], record.request["devices"], record.queue) == ("gpu", 1, "gpu")


def test_accelerator_and_devices_are_checked(client: FlaskClient) -> None:
    for bad in ({"accelerator": "tpu"}, {"devices": 0}, {"devices": 65}, {"devices": "2"}):
        response = submit(client, valid_body(**bad))
        assert response.status_code == 422
        assert set(field_errors(response)) == set(bad)
