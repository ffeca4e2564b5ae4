"""Wires the bot together: API client, Redis, the notifier, and Discord or the console."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nextcord
import redis.asyncio as aioredis

from trainer_bot.buttons import Buttons, custom_id_of
from trainer_bot.commands import Commands, RateLimiter, register_commands
from trainer_bot.config import BotConfig
from trainer_bot.embeds import CUSTOM_ID_PREFIX, LOSS_CURVE, Download
from trainer_bot.live import LiveMessages
from trainer_bot.notifier import DownloadLink, LossCurve, Notifier, NotifierSettings
from trainer_bot.sinks import ConsoleSink, DiscordSink, DmSink
from trainer_client.client import ApiError, TrainerClient

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


def download_linker(api: TrainerClient, public_api_url: str | None, ttl_s: int) -> DownloadLink:
    """A signed link to the run's model.zip at the address users reach; None without one."""

    async def link(run_id: str) -> Download | None:
        if public_api_url is None:
            return None
        try:
            links = await asyncio.to_thread(api.links, run_id, ttl_s)
        except ApiError as exc:
            log.warning("no download link for run %s: %s", run_id, exc)
            return None
        return Download(public_api_url + links.download, links.expires_at)

    return link


def notifier_for(
    config: BotConfig, client: aioredis.Redis, sink: DmSink, api: TrainerClient, live: LiveMessages
) -> Notifier:
    settings = NotifierSettings(
        consumer=config.consumer_name, edit_interval_s=config.progress_edit_interval_s
    )
    download = download_linker(api, config.public_api_url, config.link_ttl_s)
    return Notifier(client, sink, loss_curve_reader(api), settings, download=download, live=live)


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
            sink = ConsoleSink()
            await notifier_for(config, client, sink, api, LiveMessages(client, sink)).run(stop)
        else:
            await run_discord(config, config.discord_token, client, api, stop)
    finally:
        await client.aclose()
        api.close()


class TrainerBot(nextcord.Client):
    """nextcord's client, with every press of one of our buttons sent to one handler by custom_id
    prefix: nextcord matches whole custom_ids of views in memory, which a restart forgets."""

    def __init__(self) -> None:
        # The default intents hold no privileged one: slash commands and DMs need none.
        super().__init__(intents=nextcord.Intents.default())
        self.buttons: Buttons | None = None

    async def on_interaction(self, interaction: nextcord.Interaction[nextcord.Client]) -> None:
        if (
            self.buttons is not None
            and interaction.type == nextcord.InteractionType.component
            and custom_id_of(interaction).startswith(CUSTOM_ID_PREFIX)
        ):
            await self.buttons.handle(interaction)
            return
        await super().on_interaction(interaction)


def use_api_base(base: str) -> None:
    """Every REST call of nextcord, the gateway's URL (GET /gateway) and interaction answers included."""
    nextcord.http.Route.BASE = base


async def run_discord(
    config: BotConfig, token: str, client: aioredis.Redis, api: TrainerClient, stop: asyncio.Event
) -> None:
    use_api_base(config.discord_api_base)
    bot = TrainerBot()
    sink = DiscordSink(bot)
    live = LiveMessages(client, sink)
    catalog = await asyncio.to_thread(api.models)
    queues = await asyncio.to_thread(api.queues)
    register_commands(bot, Commands(api, RateLimiter(config.train_cooldown_s), live), catalog, queues)
    bot.buttons = Buttons(api, live, sink)
    # DMs go over HTTP only, so the notifier starts as soon as the token is accepted.
    await bot.login(token)
    tasks = [
        asyncio.create_task(notifier_for(config, client, sink, api, live).run(stop)),
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
