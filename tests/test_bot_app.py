"""Starting the bot: settings, the console mode as a real process, the Discord mode against the fake."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from schemas.events import TrainProgress, progress_fraction
from tests.bot_support import PNG, USER, Publisher, serve_api
from tests.conftest import DispatchRecorder
from tests.fake_discord import TOKEN, field_values, serve
from trainer_bot import embeds
from trainer_bot.app import loss_curve_reader, run
from trainer_bot.config import BotConfig, MissingSetting
from trainer_bot.notifier import GROUP
from trainer_client.client import TrainerClient
from trainer_store.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(settings, dispatched) as url:
        yield url


def test_settings_come_from_the_environment() -> None:
    config = BotConfig.from_env(
        {
            "TRAINER_API_URL": "http://api:8000/",
            "REDIS_URL": "redis://redis:6379/0",
            "TRAINER_API_KEY": "k",
            "DISCORD_TOKEN": "t",
            "PUBLIC_API_URL": "https://trainer.example/",
            "BOT_CONSUMER_NAME": "bot-2",
            "BOT_TRAIN_COOLDOWN_S": "30",
            "BOT_PROGRESS_EDIT_INTERVAL_S": "5",
            "DISCORD_API_BASE": "http://proxy:8080/api/v10/",
            "BOT_LINK_TTL_S": "3600",
        }
    )
    assert config == BotConfig(
        api_url="http://api:8000",
        redis_url="redis://redis:6379/0",
        api_key="k",
        discord_token="t",
        public_api_url="https://trainer.example",
        consumer_name="bot-2",
        train_cooldown_s=30.0,
        progress_edit_interval_s=5.0,
        discord_api_base="http://proxy:8080/api/v10",
        link_ttl_s=3600,
    )
    minimal = BotConfig.from_env({"TRAINER_API_URL": "http://api", "REDIS_URL": "redis://r"})
    assert (minimal.api_key, minimal.discord_token, minimal.public_api_url) == (None, None, None)
    assert (minimal.train_cooldown_s, minimal.consumer_name) == (10.0, "bot-1")
    assert (minimal.discord_api_base, minimal.link_ttl_s) == ("https://discord.com/api/v10", 7 * 24 * 3600)
    with pytest.raises(MissingSetting, match="REDIS_URL"):
        BotConfig.from_env({"TRAINER_API_URL": "http://api", "REDIS_URL": ""})


def bot_process(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer_bot"],
        cwd=REPO_ROOT,
        env={
            "PATH": os.environ.get("PATH", ""),
            **{k: v for k, v in os.environ.items() if k.startswith("COV")},
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_missing_required_setting_stops_the_bot_at_once_naming_it() -> None:
    process = bot_process({"REDIS_URL": "redis://127.0.0.1:1/0"})
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "TRAINER_API_URL is required but not set" in output


def test_without_a_token_the_bot_prints_each_dm_and_stops_on_sigterm(
    api_url: str, redis_url: str, redis_client: redis.Redis
) -> None:
    process = bot_process({"TRAINER_API_URL": api_url, "REDIS_URL": redis_url})
    deadline = time.monotonic() + 30
    while not redis_client.exists("trainer:events:stream") or not redis_client.xinfo_groups(
        "trainer:events:stream"
    ):
        assert time.monotonic() < deadline, "the bot did not create its consumer group"
        time.sleep(0.05)
    run = Publisher(redis_client)
    run.started()
    run.failed(status="canceled")
    while (
        redis_client.xpending("trainer:events:stream", GROUP)["pending"]
        or redis_client.xlen("trainer:events:stream") < 2
    ):
        assert time.monotonic() < deadline, "the bot did not handle the events"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "DISCORD_TOKEN is not set" in output
    assert f"--- DM to user {USER} (message 1) ---\n# Training started" in output
    assert f"--- DM to user {USER} (message 1, edited) ---\n# Training canceled" in output
    assert "[Cancel (disabled)]" in output
    assert f"--- DM to user {USER} (message 2) ---\n# Training canceled" in output
    assert "[Train again]" in output


def test_the_discord_mode_logs_in_delivers_dms_and_stops(
    api_url: str, redis_url: str, redis_client: redis.Redis
) -> None:
    async def main() -> None:
        async with serve() as fake:
            config = BotConfig(api_url=api_url, redis_url=redis_url, consumer_name="bot-9")
            stop = asyncio.Event()
            config = replace(config, discord_token=TOKEN, discord_api_base=fake.api_base)
            task = asyncio.create_task(run(config, stop))
            while not redis_client.exists("trainer:events:stream"):
                await asyncio.sleep(0.01)
            Publisher(redis_client).started()
            while not fake.of("POST", "/messages"):
                await asyncio.sleep(0.01)
            stop.set()
            await task
            # It logged in with the token, and found the gateway through the API base it was given.
            assert fake.of("GET", "/users/@me")
            assert fake.of("GET", "/gateway")
            assert fake.identifies

    asyncio.run(main())


def test_the_loss_curve_is_read_through_the_api_or_left_out(api_url: str) -> None:
    read = loss_curve_reader(TrainerClient(api_url))

    # This API has no such run: the DM goes without the chart rather than not at all.
    async def main() -> bytes | None:
        return await read("no-such-run")

    assert asyncio.run(main()) is None


def test_embeds_leave_out_what_an_event_does_not_say() -> None:
    event = TrainProgress(
        request_id="r", run_id="r", user_id=USER, epoch=2, total_epochs=4, step=7, loss=1.0, val_loss=0.9
    )
    message = embeds.progress(event)
    values = field_values(dict(message.embed.to_dict().items()))
    assert values == {"Epoch": "2/4", "Step": "7", "Loss": "1.0000", "Validation loss": "0.9000"}
    assert "25%" in str(message.embed.description)  # one of four epochs done
    assert embeds.progress_bar(1.5) == "█" * 20 + " 100%"
    assert embeds.duration(3725) == "1h 02m"
    assert (
        progress_fraction(
            TrainProgress(request_id="r", run_id="r", user_id=1, epoch=1, total_epochs=0, step=0, loss=1.0),
            None,
        )
        == 0.0
    )
    assert PNG.startswith(b"\x89PNG")
