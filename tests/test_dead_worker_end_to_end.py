"""No run lost, none run twice: a worker killed outright, a message the broker delivers again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import redis
import requests
import torch
from celery import Celery

from schemas.api import TrainRequest
from schemas.events import TrainCompleted, TrainProgress, TrainStarted
from scripts import corpus, devstack
from tests.fake_discord import TOKEN, dm_channel_id, first_embed, serve
from tests.streams import events_through_the_end
from tests.test_shutdown_end_to_end import step, wait_for
from trainer_store.runs import RUNNING_LEASES_KEY, RunStore
from trainer_tasks.app import TRAIN_TASK

LEASE_S = 3.0
# A shared machine under load trains these tiny runs in 20 s or in several minutes.
END_WAIT_S = 600.0


def worker_env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **devstack.stack_env(url, tmp_path, corpora=tmp_path),
        "APP__HEARTBEAT_INTERVAL_S": "0.5",
        "APP__PROGRESS_INTERVAL_S": "0.2",
        **extra,
    }


def train_request(tmp_path: Path, num_epochs: int) -> TrainRequest:
    return TrainRequest(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=32,
        num_epochs=num_epochs,
        batch_size=8,
        learning_rate=1e-3,
        corpus_path=corpus.write(tmp_path / "stories.txt", 600, seed=5).name,
        tokenizer_id="auto",
        user_id=7,
        seed=1,
    )


def test_a_run_whose_whole_worker_is_killed_resumes_from_its_checkpoint_and_completes_once(
    redis_url: str, tmp_path: Path
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own: no other test's worker takes it
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RunStore(client)
    # last.ckpt within the epoch too: the kill loses at most a second of training.
    env = worker_env(url, tmp_path, APP__LEASE_S=str(LEASE_S), APP__CHECKPOINT_INTERVAL_S="1")
    request = train_request(tmp_path, num_epochs=2)
    store.create(run_id="kept-run", job_id="job", user_id=7, request=request.to_mapping(), now=time.time())
    first = devstack.start_worker(env, tmp_path / "logs", name="first")
    second: devstack.Service | None = None
    try:
        Celery(broker=url).send_task(TRAIN_TASK, args=["kept-run"], queue="training")
        checkpoint_path = tmp_path / "runs" / "kept-run" / "checkpoints" / "last.ckpt"
        before = wait_for(store, "kept-run", lambda record: step(record) >= 20 and checkpoint_path.exists())
        os.killpg(first.process.pid, signal.SIGKILL)  # the Celery main process and its pool child
        first.process.wait(30)
        killed = store.get("kept-run")
        assert killed is not None
        assert (killed.status, killed.attempt) == ("running", 1)
        checkpoint: object = torch.load(checkpoint_path, weights_only=False)
        assert isinstance(checkpoint, dict)
        saved_step = checkpoint["global_step"]
        assert 0 < saved_step <= step(killed)

        # A fresh worker's periodic check finds the run whose lease expired and sends it back.
        second = devstack.start_worker(env, tmp_path / "logs", name="second")
        ended = wait_for(store, "kept-run", lambda record: record.is_terminal, timeout_s=END_WAIT_S)
        assert (ended.status, ended.attempt) == ("completed", 2), ended
        assert ended.train_s > 0
        assert client.zscore(RUNNING_LEASES_KEY, "kept-run") is None
        events = events_through_the_end(client, "kept-run")
        assert len([event for event in events if isinstance(event, TrainCompleted)]) == 1
        resumed = [
            event
            for event in events
            if isinstance(event, TrainProgress) and (event.seq or 0) > killed.last_seq
        ]
        # Resumed from the checkpoint: the new attempt's steps continue from the saved one.
        assert resumed[0].step > saved_step
        assert before.last_seq <= killed.last_seq
        assert "its worker stopped answering" in second.log()
    finally:
        if first.process.poll() is None:
            first.stop()
        if second is not None:
            second.stop()
        client.flushdb()


def test_a_message_delivered_again_while_its_run_trains_is_executed_once(
    redis_url: str, tmp_path: Path
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/6"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RunStore(client)
    # Redis hands the unacknowledged message out again 2 s after the first delivery, and again after that.
    env = worker_env(url, tmp_path, CELERY_VISIBILITY_TIMEOUT_S="2")
    request = train_request(tmp_path, num_epochs=1)
    store.create(run_id="once-run", job_id="job", user_id=7, request=request.to_mapping(), now=time.time())
    logs = tmp_path / "logs"
    workers = [
        devstack.start_procfile("worker", {**env, "WORKER_NAME": name}, logs, name=name) for name in "ab"
    ]
    try:
        for worker in workers:
            devstack.wait_ready(worker, devstack.worker_ready(worker), 120)
        Celery(broker=url).send_task(TRAIN_TASK, args=["once-run"], queue="training")
        ended = wait_for(store, "once-run", lambda record: record.is_terminal, timeout_s=END_WAIT_S)
        assert (ended.status, ended.attempt) == ("completed", 1), ended
        events = events_through_the_end(client, "once-run")
        assert len([event for event in events if isinstance(event, TrainStarted)]) == 1
        assert len([event for event in events if isinstance(event, TrainCompleted)]) == 1
        # The idle worker took the message delivered again while the other trained, and did nothing.
        logs_text = "".join(worker.log() for worker in workers)
        assert "succeeded" in logs_text
        assert "'held-elsewhere'" in logs_text
    finally:
        for worker in workers:
            worker.stop()
        client.flushdb()


def test_a_run_completes_when_redis_is_killed_and_started_again_mid_run(tmp_path: Path) -> None:
    """Redis with its append-only file on, as production runs it: the run, its lease and its message
    outlive a restart; the worker trains through it, and the API and the bot reconnect by themselves."""
    asyncio.run(redis_restarted_mid_run(tmp_path))


async def redis_restarted_mid_run(tmp_path: Path) -> None:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    service, url = devstack.start_redis(workdir, append_only=True)
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    client = redis.Redis.from_url(url)
    store = RunStore(client)
    env = worker_env(url, tmp_path, SECURITY__LINK_SECRET="restart-link-secret")
    # A fast machine may end these epochs while Redis is away: then the end's record and event wait for it.
    request = train_request(tmp_path, num_epochs=3)
    store.create(run_id="kept-run", job_id="job", user_id=7, request=request.to_mapping(), now=time.time())
    logs = tmp_path / "logs"
    async with serve() as fake:
        web, api_url = await asyncio.to_thread(devstack.start_web, env, logs)
        bot_env = {
            **env,
            "TRAINER_API_URL": api_url,
            "PUBLIC_API_URL": api_url,
            "DISCORD_TOKEN": TOKEN,
            "DISCORD_API_BASE": fake.api_base,
            "BOT_CONSUMER_NAME": "bot-redis-restart",
        }
        bot = await asyncio.to_thread(devstack.start_procfile, "bot", bot_env, logs)
        worker = await asyncio.to_thread(devstack.start_worker, env, logs, name="through")
        try:
            await fake.connected()
            Celery(broker=url).send_task(TRAIN_TASK, args=["kept-run"], queue="training")
            await asyncio.to_thread(wait_for, store, "kept-run", lambda record: step(record) >= 10)
            os.kill(service.process.pid, signal.SIGKILL)
            service.process.wait()
            await asyncio.sleep(2)  # heartbeats and events fail meanwhile; training goes on
            service, _ = await asyncio.to_thread(devstack.start_redis, workdir, port=port, append_only=True)
            ended = await asyncio.to_thread(
                wait_for, store, "kept-run", lambda record: record.is_terminal, END_WAIT_S
            )
            assert (ended.status, ended.attempt) == ("completed", 1), ended
            events = await asyncio.to_thread(events_through_the_end, client, "kept-run")
            assert len([event for event in events if isinstance(event, TrainCompleted)]) == 1
            assert "heartbeat failed" in worker.log()
            # The API answers from the Redis it lost, and the bot DMs the completion it read after it.
            answer = await asyncio.to_thread(requests.get, f"{api_url}/runs/kept-run", timeout=10)
            assert (answer.status_code, answer.json()["status"]) == (200, "completed")
            dm = f"/channels/{dm_channel_id(7)}/messages"
            deadline = time.monotonic() + 120
            while not [r for r in fake.of("POST", dm) if first_embed(r).get("title") == "Training completed"]:
                assert time.monotonic() < deadline, bot.log()
                await asyncio.sleep(0.1)
        finally:
            for process in (worker, bot, web, service):
                await asyncio.to_thread(process.stop)
