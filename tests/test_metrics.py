"""`GET /metrics`: Prometheus text from the API, Redis and gunicorn's worker processes, behind the key."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import EVENTS_STREAM
from schemas.queues import broker_lists
from scripts import devstack
from tests.conftest import DispatchRecorder, Stack
from trainer_api import create_app
from trainer_api.metrics import queues as metrics_queues
from trainer_store.metrics import METRICS_KEY
from trainer_store.runs import RunStore
from trainer_store.settings import Settings
from trainer_store.workers import WorkerEntry, WorkerRegistry

DISCORD_USER = 987654321098765432
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by name and labels; the parser refuses anything that is not the text format."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: FlaskClient, headers: dict[str, str] | None = None) -> Samples:
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=")
    return parse(response.get_data(as_text=True))


def test_runs_by_status_queue_lengths_and_counters_come_from_redis(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    # The run store keeps the counts on each transition: one run queued, one running, two ended.
    store = RunStore(redis_client)
    for run_id in ("waiting", "training", "done", "broken"):
        store.create(run_id=run_id, job_id=f"job-{run_id}", user_id=0, request={}, now=time.time())
    for run_id in ("training", "done", "broken"):
        assert store.claim(run_id, "worker", 60, time.time())
    assert store.finish("done", "completed", "completed", time.time())
    assert store.finish("broken", "failed", "broke", time.time())
    # A queue's tasks wait in one list per priority step: a resumed run's, then new ones'.
    resumed, new = broker_lists("training")[0], broker_lists("training")[2]
    redis_client.lpush(resumed, "m1")
    redis_client.lpush(new, "m2", "m3")
    redis_client.lpush(broker_lists("light")[2], "m4")
    # A queue no configuration names has a series while a live worker consumes it.
    gpu = WorkerEntry("gpu@box", "box", ["gpu"], 1, "gpu", 2, 1)
    WorkerRegistry(redis_client).register(gpu, ttl_s=60, now=time.time())
    redis_client.lpush(broker_lists("gpu")[2], "m5")
    redis_client.hincrby(METRICS_KEY, "events_published", 42)
    redis_client.hincrby(METRICS_KEY, "bot_dms_sent", 5)
    redis_client.hincrby(METRICS_KEY, "bot_dms_refused", 2)
    redis_client.hincrby(METRICS_KEY, "bot_dms_parked", 1)

    samples = scrape(client)
    assert value(samples, "trainer_redis_up") == 1
    assert [value(samples, "trainer_runs", status=s) for s in ("queued", "running")] == [1, 1]
    finished = ("completed", "failed", "canceled")
    assert [value(samples, "trainer_runs_finished_total", status=s) for s in finished] == [1, 1, 0]
    assert value(samples, "trainer_queue_length", queue="training") == 3
    assert value(samples, "trainer_queue_length", queue="light") == 1
    assert value(samples, "trainer_queue_length", queue="gpu") == 1
    assert value(samples, "trainer_events_published_total") == 42
    assert value(samples, "trainer_bot_dms_sent_total") == 5
    assert value(samples, "trainer_bot_dms_refused_total") == 2
    assert value(samples, "trainer_bot_dms_parked_total") == 1


def test_requests_are_counted_by_url_rule_and_status_with_their_latency(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    route = "/runs/<string:run_id>"
    before = scrape(client)
    for run_id in ("a1", "b2", "c3"):
        assert client.get(f"/runs/{run_id}").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("trainer_http_requests_total", method="GET", route=route, status="404") == 3
    assert moved("trainer_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert moved("trainer_http_request_duration_seconds_count", method="GET", route=route) == 3
    assert moved("trainer_http_request_duration_seconds_sum", method="GET", route=route) > 0
    assert not any("a1" in str(labels) for _, labels in after), "raw paths never become labels"
    assert moved("trainer_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_an_unreachable_redis_still_answers_with_redis_down(settings: Settings) -> None:
    closed = f"redis://127.0.0.1:{devstack.free_port()}/0"
    app = create_app(replace(settings, redis_url=closed), dispatch=DispatchRecorder())
    samples = scrape(app.test_client())
    assert value(samples, "trainer_redis_up") == 0
    assert not any(name == "trainer_runs" for name, _ in samples)


def test_the_api_key_or_the_metrics_token_opens_metrics(
    settings: Settings, redis_client: redis.Redis
) -> None:
    keyed = create_app(replace(settings, api_key="k3y"), dispatch=DispatchRecorder()).test_client()
    assert keyed.get("/metrics").status_code == 401
    scrape(keyed, {"X-Api-Key": "k3y"})

    both = replace(settings, api_key="k3y", metrics_token="t0ken")
    tokened = create_app(both, dispatch=DispatchRecorder()).test_client()
    scrape(tokened, {"Authorization": "Bearer t0ken"})
    scrape(tokened, {"X-Api-Key": "k3y"})
    for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic t0ken"}):
        refused = tokened.get("/metrics", headers=wrong)
        assert refused.status_code == 401
        assert refused.get_json()["code"] == "UNAUTHORIZED"
        assert "Bearer" in refused.get_json()["message"]
    assert tokened.get("/runs/x", headers={"Authorization": "Bearer t0ken"}).status_code == 401, (
        "the metrics token opens nothing else"
    )

    token_only = create_app(replace(settings, metrics_token="t0ken"), dispatch=DispatchRecorder())
    assert token_only.test_client().get("/metrics").status_code == 401
    scrape(token_only.test_client(), {"Authorization": "bearer t0ken"})


def worker_pids(master_pid: int) -> list[int]:
    """The processes whose parent is gunicorn's master (field 4 of /proc/<pid>/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended while we looked
        if int(fields[1]) == master_pid:
            found.append(int(stat.parent.name))
    return found


def test_counts_add_up_across_gunicorn_workers_even_after_one_is_killed(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "WEB_CONCURRENCY": "2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    web, url = devstack.start_web(env, tmp_path)
    try:
        devstack.wait_until(lambda: len(worker_pids(web.process.pid)) == 2, 30, "two workers")

        def models_count() -> float:
            text = requests.get(f"{url}/metrics", timeout=10).text
            return value(
                parse(text), "trainer_http_requests_total", method="GET", route="/models", status="200"
            )

        for _ in range(20):
            assert requests.get(f"{url}/models", timeout=10).status_code == 200
        # Whichever worker answers the scrape, it reports what both answered.
        assert {models_count() for _ in range(6)} == {20.0}
        answered = {int(pid) for pid in worker_pids(web.process.pid)}
        os.kill(answered.pop(), signal.SIGKILL)
        devstack.wait_until(
            lambda: (
                len(set(worker_pids(web.process.pid)) - answered) == 1
                and len(worker_pids(web.process.pid)) == 2
            ),
            30,
            "a replacement worker",
        )
        assert models_count() == 20.0, "a dead worker's counts stay"
    finally:
        web.stop()
    assert "child_exit" not in web.log(), web.log()


def test_one_real_run_moves_every_series(stack: Stack, tmp_path: Path) -> None:
    """A Discord user's run through the API, the worker and the bot (printing its DMs, with no token):
    the request series, runs by status, events published and DMs sent move; every queue has its length."""
    env = {**stack.env, "TRAINER_API_URL": stack.api_url, "DISCORD_TOKEN": ""}
    bot = devstack.start_procfile("bot", env, tmp_path / "logs")
    client = redis.Redis.from_url(stack.redis_url)

    def bot_consumes() -> bool:
        try:
            return any(group["name"] == b"trainer-bot" for group in client.xinfo_groups(EVENTS_STREAM))
        except redis.ResponseError:
            return False

    def snapshot() -> Samples:
        return parse(requests.get(f"{stack.api_url}/metrics", timeout=10).text)

    try:
        devstack.wait_until(bot_consumes, 60, "the bot's consumer group", bot)
        before = snapshot()
        body = {
            "corpus_path": "stories.txt",
            "user_id": DISCORD_USER,
            "model_size": "tiny",
            "max_seq_len": 32,
        }
        response = requests.post(f"{stack.api_url}/runs/train", json=body, timeout=10)
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        deadline = time.monotonic() + 180
        while requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()["status"] != "completed":
            assert time.monotonic() < deadline, "the run did not complete"
            time.sleep(0.5)
        # The bot's last DM for the run: the completed one.
        devstack.wait_until(lambda: "# Training completed" in bot.log(), 60, "the bot's last DM", bot)
        after = snapshot()
    finally:
        bot.stop()
        client.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("trainer_http_requests_total", method="POST", route="/runs/train", status="202") == 1
    assert moved("trainer_http_request_duration_seconds_count", method="POST", route="/runs/train") == 1
    assert (
        moved("trainer_http_request_duration_seconds_bucket", method="POST", route="/runs/train", le="+Inf")
        == 1
    )
    assert (
        moved("trainer_http_requests_total", method="GET", route="/runs/<string:run_id>", status="200") >= 1
    )
    assert moved("trainer_runs_finished_total", status="completed") == 1
    assert {("trainer_runs", status) for status in ("queued", "running")} <= {
        (name, dict(labels).get("status")) for name, labels in after
    }
    # started, at least one progress, completed.
    assert moved("trainer_events_published_total") >= 3
    # Queued (a new message), started, completed: the live message is edited in place, not counted.
    assert moved("trainer_bot_dms_sent_total") >= 2
    queues = {dict(labels)["queue"] for name, labels in after if name == "trainer_queue_length"}
    assert queues == set(metrics_queues())
    assert value(after, "trainer_queue_length", queue="training") == 0
    assert value(after, "trainer_redis_up") == 1
    for counter in ("refused", "parked"):  # nothing refused or parked on the way: present, unmoved
        assert ("trainer_bot_dms_" + counter + "_total", frozenset()) in after
        assert moved(f"trainer_bot_dms_{counter}_total") == 0


@pytest.mark.parametrize("made_here", [True, False])
def test_gunicorns_metrics_folder_is_emptied_at_start(
    made_here: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configuration on its own: old samples go; a folder it made goes at exit, a given one stays."""
    # Set first, so that the variable the module sets for itself is undone after the test as well.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    if made_here:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    sys.modules.pop("gunicornconfig", None)
    config = importlib.import_module("gunicornconfig")
    try:
        (config.METRICS_DIR / "counter_123.db").parent.mkdir(parents=True, exist_ok=True)
        (config.METRICS_DIR / "counter_123.db").write_bytes(b"old")
        config.on_starting(None)
        assert list(config.METRICS_DIR.iterdir()) == []
        config.on_exit(None)
        assert config.METRICS_DIR.exists() is not made_here
    finally:
        sys.modules.pop("gunicornconfig", None)
