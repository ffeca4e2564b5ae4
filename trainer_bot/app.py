"""Wires the bot together: API client, Redis, the notifier, and Discord or the console."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nextcord
import redis.asyncio as aioredis

from trainer_bot.client import ApiError, TrainerClient
from trainer_bot.commands import Commands, RateLimiter, build_commands
from trainer_bot.config import BotConfig
from trainer_bot.embeds import LOSS_CURVE
from trainer_bot.notifier import LossCurve, Notifier, NotifierSettings
from trainer_bot.sinks import ConsoleSink, DiscordSink, DmSink

log = logging.getLogger(__name__)


def loss_curve_reader(api: TrainerClient) -> LossCurve:
    """The run's loss-curve image through the API (never the worker's disk); None when it has none."""

    async def read(run_id: str) -> bytes | None:
        try:
            return await asyncio.to_thread(api.artifact, run_id, LOSS_CURVE)
        except ApiError as exc:
            # A DM without the chart beats a DM held back while the API is unwell.
            log.warning("no loss curve for run %s: %s", run_id, exc)
            return None

    return read


def notifier_for(config: BotConfig, client: aioredis.Redis, sink: DmSink, api: TrainerClient) -> Notifier:
    settings = NotifierSettings(
        consumer=config.consumer_name,
        edit_interval_s=config.progress_edit_interval_s,
        public_api_url=config.public_api_url,
    )
    return Notifier(client, sink, loss_curve_reader(api), settings)


def connect_redis(url: str) -> aioredis.Redis:
    # Blocking reads last at most a second, so a 5 s socket timeout only trips on a dead connection.
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)


async def run(config: BotConfig, stop: asyncio.Event) -> None:
    """Serve until `stop` is set: DMs to Discord when there is a token, else to the console."""
    api = TrainerClient(config.api_url, config.api_key)
    client = connect_redis(config.redis_url)
    try:
        if config.discord_token is None:
            log.info("DISCORD_TOKEN is not set: direct messages are printed here instead")
            await notifier_for(config, client, ConsoleSink(), api).run(stop)
        else:
            await run_discord(config, config.discord_token, client, api, stop)
    finally:
        await client.aclose()
        api.close()


async def run_discord(
    config: BotConfig, token: str, client: aioredis.Redis, api: TrainerClient, stop: asyncio.Event
) -> None:
    # The default intents hold no privileged one: slash commands and DMs need none.
    bot = nextcord.Client(intents=nextcord.Intents.default())
    catalog = await asyncio.to_thread(api.models)
    commands = Commands(api, RateLimiter(config.train_cooldown_s))
    for command in build_commands(commands, catalog):
        bot.add_application_command(command)
    # DMs go over HTTP only, so the notifier starts as soon as the token is accepted.
    await bot.login(token)
    tasks = [
        asyncio.create_task(notifier_for(config, client, DiscordSink(bot), api).run(stop)),
        asyncio.create_task(bot.connect()),
        asyncio.create_task(stop.wait()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        await bot.close()
    for task in done:
        task.result()
