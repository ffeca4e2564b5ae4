"""Helpers for the bot's tests: an injected clock, event factories, and the real API on a thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import nextcord
import redis
from werkzeug.serving import make_server

from schemas.events import TrainCompleted, TrainEvent, TrainFailed, TrainProgress, TrainStarted
from tests.fake_discord import TOKEN, FakeDiscord
from trainer_api import create_app
from trainer_api.services import Dispatch
from trainer_bot.app import run
from trainer_bot.config import BotConfig
from trainer_store.settings import Settings
from trainer_tasks.events import EventBus

USER = 123456789012345678
OTHER_USER = 876543210987654321
# The smallest valid PNG signature and header are enough for an attachment's bytes to be checked.
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Publisher:
    """Sends events the way the worker does (EventBus), stamping them like the reporter."""

    def __init__(self, client: redis.Redis, run_id: str | None = None, user_id: int = USER) -> None:
        self.bus = EventBus(client, stream_maxlen=10_000)
        self.run_id = run_id or uuid.uuid4().hex
        self.user_id = user_id
        self.seq = 0

    def _common(self) -> dict[str, object]:
        self.seq += 1
        return {"event_id": uuid.uuid4().hex, "seq": self.seq, "ts": 1_700_000_000.0 + self.seq}

    def send(self, event: TrainEvent) -> TrainEvent:
        assert self.bus.send(event)
        return event

    def started(self) -> TrainEvent:
        c = self._common()
        return self.send(
            TrainStarted(
                request_id=self.run_id,
                run_id=self.run_id,
                user_id=self.user_id,
                event_id=str(c["event_id"]),
                seq=self.seq,
                ts=1_700_000_000.0,
                model_family="gpt2",
                model_size="tiny",
                total_epochs=2,
                queue="training",
                cpu_cores=2,
                memory_mb=4096,
                optimal_threads=2,
                batch_size=8,
                learning_rate=0.001,
            )
        )

    def progress(self, step: int, loss: float = 3.5, eta_s: float | None = 30.0) -> TrainEvent:
        c = self._common()
        return self.send(
            TrainProgress(
                request_id=self.run_id,
                run_id=self.run_id,
                user_id=self.user_id,
                event_id=str(c["event_id"]),
                seq=self.seq,
                ts=1_700_000_000.0 + step,
                epoch=1 + step // 100,
                total_epochs=2,
                step=step,
                loss=loss,
                tokens_per_sec=8912.0,
                eta_s=eta_s,
                val_loss=None,
            )
        )

    def completed(self) -> TrainEvent:
        c = self._common()
        return self.send(
            TrainCompleted(
                request_id=self.run_id,
                run_id=self.run_id,
                user_id=self.user_id,
                event_id=str(c["event_id"]),
                seq=self.seq,
                loss=2.25,
                perplexity=9.49,
                artifact_path=f"/srv/artifacts/models/{self.run_id}",
                sample="the cat sat on the mat",
                params=1_461_760,
                duration_s=125.0,
            )
        )

    def failed(self, status: str = "failed", error_kind: str = "user") -> TrainEvent:
        c = self._common()
        return self.send(
            TrainFailed(
                request_id=self.run_id,
                run_id=self.run_id,
                user_id=self.user_id,
                event_id=str(c["event_id"]),
                seq=self.seq,
                error_kind="user" if error_kind == "user" else "system",
                message="the corpus is too small for batch_size 8",
                status="canceled" if status == "canceled" else "failed",
            )
        )


@contextmanager
def serve_api(settings: Settings, dispatch: Dispatch) -> Iterator[str]:
    """The real Flask app over real HTTP on a free loopback port, for as long as the block runs."""
    server = make_server("127.0.0.1", 0, create_app(settings, dispatch=dispatch), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


COMMANDS = {"train_model", "train_status", "train_cancel", "train_runs"}


@asynccontextmanager
async def bot_on(
    fake: FakeDiscord, api_url: str, redis_url: str, train_cooldown_s: float = 10.0
) -> AsyncIterator[None]:
    """The bot's whole Discord mode in this process, connected to the fake's gateway; stopped after."""
    saved = nextcord.http.Route.BASE
    config = BotConfig(
        api_url=api_url,
        redis_url=redis_url,
        discord_token=TOKEN,
        discord_api_base=fake.api_base,
        consumer_name="bot-in-process",
        progress_edit_interval_s=0.2,
        train_cooldown_s=train_cooldown_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(config, stop))
    try:
        await fake.connected()
        deadline = time.monotonic() + 30
        while set(fake.commands) != COMMANDS:
            assert time.monotonic() < deadline, f"commands not registered: {sorted(fake.commands)}"
            assert not task.done(), task
            await asyncio.sleep(0.01)
        yield
    finally:
        stop.set()
        await task
        nextcord.http.Route.BASE = saved
