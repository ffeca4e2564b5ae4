"""Slash commands end to end: Discord interactions from a fake Discord, the real API over HTTP, real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nextcord
import pytest
import redis

from schemas.runs import RunStore, run_key
from schemas.settings import Settings
from scripts.devstack import free_port
from tests.bot_support import OTHER_USER, USER, FakeClock, serve_api
from tests.conftest import DispatchRecorder
from tests.fake_discord import FakeDiscord, fake_discord
from trainer_bot.client import TrainerClient, TrainOrder
from trainer_bot.commands import Commands, RateLimiter, build_commands

INTERACTION_IDS = itertools.count(7000)


@dataclass
class Harness:
    fake: FakeDiscord
    bot: nextcord.Client
    api: TrainerClient
    clock: FakeClock

    async def use(self, name: str, user_id: int = USER, **options: object) -> str:
        """Sends the interaction Discord would for `/name option:value ...`; answers the bot's reply."""
        payload_options: list[dict[str, object]] = []
        resolved: dict[str, object] = {}
        for key, value in options.items():
            if isinstance(value, dict):  # an attachment: Discord sends its id and resolves it alongside
                resolved.setdefault("attachments", {})
                attachments = resolved["attachments"]
                assert isinstance(attachments, dict)
                attachments[str(value["id"])] = value
                payload_options.append({"name": key, "type": 11, "value": str(value["id"])})
            else:
                kind = {str: 3, int: 4, float: 10}[type(value)]
                payload_options.append({"name": key, "type": kind, "value": value})
        interaction_id = next(INTERACTION_IDS)
        payload: dict[str, object] = {
            "id": str(interaction_id),
            "application_id": "1000",
            "type": 2,
            "token": f"token-{interaction_id}",
            "version": 1,
            "channel_id": "42",
            "user": {"id": str(user_id), "username": "someone", "discriminator": "0", "avatar": None},
            "data": {
                "id": self.fake.command_id(name),
                "name": name,
                "type": 1,
                "options": payload_options,
                "resolved": resolved,
            },
        }
        before = len(self.fake.followups())
        # As it arrives from the gateway: JSON text, parsed.
        wire = json.loads(json.dumps(payload))
        interaction: nextcord.Interaction[nextcord.Client] = nextcord.Interaction(
            data=wire, state=self.bot._connection
        )
        await self.bot.process_application_commands(interaction)
        callbacks = self.fake.of("POST", f"/interactions/{interaction_id}/")
        assert len(callbacks) == 1, "deferred exactly once"
        assert callbacks[0].body == {"type": 5, "data": {"flags": 64}}, "deferred as ephemeral"
        followups = self.fake.followups()[before:]
        assert len(followups) == 1
        return followups[0]


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(settings, dispatched) as url:
        yield url


@asynccontextmanager
async def harness(api_url: str) -> AsyncIterator[Harness]:
    async with fake_discord() as (fake, bot):
        api = TrainerClient(api_url)
        clock = FakeClock()
        commands = Commands(api, RateLimiter(10.0, clock))
        for command in build_commands(commands, await asyncio.to_thread(api.models)):
            bot.add_application_command(command)
        await bot.sync_application_commands()  # what the bot does on connect
        assert set(fake.commands) == {"train_model", "train_status", "train_cancel", "train_runs"}
        yield Harness(fake, bot, api, clock)


def submit(api: TrainerClient, user_id: int = USER) -> str:
    order = TrainOrder(
        user_id=user_id,
        model_family="gpt2",
        model_size="tiny",
        num_epochs=1,
        batch_size=8,
        learning_rate=1e-3,
        corpus_path="notes.txt",
    )
    return api.train(order).run_id


def test_status_shows_the_callers_own_run_only(api_url: str) -> None:
    async def scenario() -> None:
        async with harness(api_url) as h:
            mine, theirs = submit(h.api), submit(h.api, OTHER_USER)
            reply = await h.use("train_status", run_id=mine)
            assert reply.startswith(f"`{mine}`: **queued**, started <t:")
            for run_id in (theirs, "no-such-run"):
                assert await h.use("train_status", run_id=run_id) == (
                    f"You have no run `{run_id}`. /train_runs lists yours."
                )

    asyncio.run(scenario())


def test_cancel_asks_the_api_for_own_runs_and_says_when_it_ended(
    api_url: str, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with harness(api_url) as h:
            mine, theirs = submit(h.api), submit(h.api, OTHER_USER)
            assert "Cancellation requested" in await h.use("train_cancel", run_id=mine)
            assert RunStore(redis_client).cancel_requested(mine)
            assert "You have no run" in await h.use("train_cancel", run_id=theirs)
            assert not RunStore(redis_client).cancel_requested(theirs)
            redis_client.hset(
                run_key(mine), mapping={"status": "canceled", "message": "canceled at your request"}
            )
            ended = await h.use("train_cancel", run_id=mine)
            assert ended.startswith(
                f"The training service answered CONFLICT: run '{mine}' has already ended (canceled); "
                "there is nothing to cancel (request_id `"
            )
            reply = await h.use("train_status", run_id=mine)
            assert "**canceled**" in reply
            assert reply.endswith(":R>: canceled at your request")

    asyncio.run(scenario())


def test_runs_lists_the_callers_runs_newest_first(api_url: str, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        async with harness(api_url) as h:
            assert await h.use("train_runs") == "You have no training runs yet. Start one with /train_model."
            first, second = submit(h.api), submit(h.api)
            submit(h.api, OTHER_USER)
            redis_client.hset(
                run_key(first), mapping={"status": "completed", "loss": 2.5, "perplexity": 12.18}
            )
            reply = await h.use("train_runs")
            lines = reply.splitlines()
            assert lines[0] == "Your latest runs:"
            assert [line.split("`")[1] for line in lines[1:]] == [second, first]
            assert lines[2].endswith("loss 2.5000, perplexity 12.18")

    asyncio.run(scenario())


def test_train_model_is_rate_limited_per_user_and_api_errors_carry_the_request_id(api_url: str) -> None:
    async def scenario() -> None:
        async with harness(api_url) as h:
            first = await h.use("train_model", corpus_name="missing.txt", epochs=2)
            assert "The training service" in first
            assert "request_id `" in first
            assert "Traceback" not in first
            assert await h.use("train_model", corpus_name="missing.txt") == (
                "Easy there: one training request every few seconds. Try again in 10 s."
            )
            # Someone else is not held up by it.
            assert "request_id" in await h.use("train_model", OTHER_USER, corpus_name="missing.txt")
            h.clock.advance(10)
            assert "request_id" in await h.use("train_model", corpus_name="missing.txt")

    asyncio.run(scenario())


def test_train_model_checks_the_corpus_before_calling_the_api(api_url: str) -> None:
    async def scenario() -> None:
        async with harness(api_url) as h:
            assert "either as a text-file attachment or as the name" in await h.use("train_model")
            h.clock.advance(10)
            image = {
                "id": "1",
                "filename": "cat.png",
                "size": 10,
                "url": "",
                "proxy_url": "",
                "content_type": "image/png",
            }
            assert (
                await h.use("train_model", corpus_file=image)
                == "`cat.png` is not a text file; attach a .txt file."
            )
            h.clock.advance(10)
            huge = {"id": "2", "filename": "big.txt", "size": 50 * 2**20, "url": "", "proxy_url": ""}
            assert "the limit is 10,485,760" in await h.use("train_model", corpus_file=huge)
            h.clock.advance(10)
            gone = {
                "id": "3",
                "filename": "gone.txt",
                "size": 10,
                "url": f"{h.fake.base_url}/cdn/gone.txt",
                "proxy_url": "",
            }
            reply = await h.use("train_model", corpus_file=gone)
            assert reply.startswith("Something went wrong on our side at ")

    asyncio.run(scenario())


def test_an_unreachable_api_is_a_friendly_message() -> None:
    async def scenario() -> None:
        with serve_api(Settings(), DispatchRecorder()) as url:
            async with harness(url) as h:
                h.api._base_url = f"http://127.0.0.1:{free_port()}"  # the API goes away after start-up
                reply = await h.use("train_status", run_id="abc")
                assert reply.startswith(
                    "The training service is not answering right now; try again in a minute."
                )
                assert "(request_id `" in reply

    asyncio.run(scenario())
