"""Slash commands end to end: Discord interactions from a fake Discord, the real API over HTTP, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import redis

from tests.bot_support import OTHER_USER, USER, FakeClock, bot_on, serve_api
from tests.conftest import DispatchRecorder
from tests.fake_discord import FakeDiscord, serve
from trainer_bot.commands import RateLimiter
from trainer_client.client import TrainerClient, TrainOrder
from trainer_store.runs import RunStore, run_key
from trainer_store.settings import Settings
from trainer_store.workers import WorkerEntry, WorkerRegistry


@dataclass
class Harness:
    fake: FakeDiscord
    api: TrainerClient

    async def use(self, name: str, user_id: int = USER, **options: object) -> str:
        """`/name option:value ...` through the gateway; answers the bot's reply."""
        interaction_id = await self.fake.use_command(name, user_id, **options)
        reply = await self.fake.answer_to(interaction_id)
        callbacks = self.fake.callbacks(interaction_id)
        assert len(callbacks) == 1, "deferred exactly once"
        assert callbacks[0].body == {"type": 5, "data": {"flags": 64}}, "deferred as ephemeral"
        return reply


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(settings, dispatched) as url:
        yield url


@asynccontextmanager
async def harness(api_url: str, redis_url: str, cooldown_s: float = 0.0) -> AsyncIterator[Harness]:
    async with serve() as fake, bot_on(fake, api_url, redis_url, train_cooldown_s=cooldown_s):
        yield Harness(fake, TrainerClient(api_url))


def submit(api: TrainerClient, user_id: int = USER, accelerator: str | None = None) -> str:
    order = TrainOrder(
        user_id=user_id,
        model_family="gpt2",
        model_size="tiny",
        num_epochs=1,
        batch_size=8,
        learning_rate=1e-3,
        corpus_path="notes.txt",
        accelerator=accelerator,
    )
    return api.train(order).run_id


def test_status_shows_the_callers_own_run_only(api_url: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
            mine, theirs = submit(h.api), submit(h.api, OTHER_USER)
            reply = await h.use("train_status", run_id=mine)
            assert reply.startswith(f"`{mine}`: **queued**, started <t:")
            for run_id in (theirs, "no-such-run"):
                assert await h.use("train_status", run_id=run_id) == (
                    f"You have no run `{run_id}`. /train_runs lists yours."
                )

    asyncio.run(scenario())


def test_cancel_asks_the_api_for_own_runs_and_says_when_it_ended(
    api_url: str, redis_url: str, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
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


def test_runs_lists_the_callers_runs_newest_first(
    api_url: str, redis_url: str, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
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


def test_train_model_is_rate_limited_per_user_and_api_errors_carry_the_request_id(
    api_url: str, redis_url: str
) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url, cooldown_s=10) as h:
            first = await h.use("train_model", corpus_name="missing.txt", epochs=2)
            assert "The training service" in first
            assert "request_id `" in first
            assert "Traceback" not in first
            assert await h.use("train_model", corpus_name="missing.txt") == (
                "Easy there: one training request every few seconds. Try again in 10 s."
            )
            # Someone else is not held up by it.
            assert "request_id" in await h.use("train_model", OTHER_USER, corpus_name="missing.txt")

    asyncio.run(scenario())


def test_train_model_checks_the_corpus_before_calling_the_api(api_url: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
            assert "either as a text-file attachment or as the name" in await h.use("train_model")
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
            huge = {"id": "2", "filename": "big.txt", "size": 50 * 2**20, "url": "", "proxy_url": ""}
            assert "the limit is 10,485,760" in await h.use("train_model", corpus_file=huge)
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


def test_an_unreachable_api_is_a_friendly_message(redis_url: str) -> None:
    async def scenario() -> None:
        with contextlib.ExitStack() as api:
            url = api.enter_context(serve_api(Settings(redis_url=redis_url), DispatchRecorder()))
            async with harness(url, redis_url) as h:
                api.close()  # the API goes away after start-up
                reply = await h.use("train_status", run_id="abc")
                assert reply.startswith(
                    "The training service is not answering right now; try again in a minute."
                )
                assert "(request_id `" in reply

    asyncio.run(scenario())


def test_the_rate_limiter_counts_per_user_on_its_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock)
    assert limiter.wait_s(USER) == 0
    clock.advance(4)
    assert limiter.wait_s(USER) == 6
    assert limiter.wait_s(OTHER_USER) == 0
    clock.advance(6)
    assert limiter.wait_s(USER) == 0


def test_train_model_offers_the_live_queues_and_says_how_many_runs_are_ahead(
    api_url: str, redis_url: str, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    registry = WorkerRegistry(redis_client)
    for hostname, queue in (("gpu@box", "gpu"), ("light@box", "light"), ("big@box", "big")):
        registry.register(WorkerEntry(hostname, "box", [queue], 1, "cpu", 1, 1), ttl_s=120, now=time.time())

    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
            options = command_options(h.fake)
            assert choices(options["queue"]) == ["big", "gpu"]
            assert choices(options["accelerator"]) == ["auto", "cpu", "gpu"]
            assert (options["devices"]["min_value"], options["devices"]["max_value"]) == (1, 64)
            ahead = submit(h.api, OTHER_USER, accelerator="gpu")
            reply = await h.use("train_model", corpus_name="notes.txt", accelerator="gpu", devices=1)
            run_id = reply.split("`")[1]
            assert [(task.args[0], task.queue) for task in dispatched.tasks] == [
                (ahead, "gpu"),
                (run_id, "gpu"),
            ]
            fields = h.fake.sent_embeds()[-1]["fields"]
            assert isinstance(fields, list)
            assert {"name": "Queue", "value": "gpu: 1 run ahead of yours", "inline": True} in fields
            status = await h.use("train_status", run_id=run_id)
            assert ", 1 run ahead of yours on queue `gpu`" in status
            assert (await h.use("train_model", corpus_name="notes.txt", queue="big")).startswith(
                "Training queued"
            )
            assert dispatched.tasks[-1].queue == "big"

    asyncio.run(scenario())


def command_options(fake: FakeDiscord) -> dict[str, dict[str, object]]:
    """/train_model's options as the bot registered them, by name."""
    listed = fake.commands["train_model"]["options"]
    assert isinstance(listed, list)
    return {str(option["name"]): option for option in listed}


def choices(option: dict[str, object]) -> list[object]:
    listed = option["choices"]
    assert isinstance(listed, list)
    return [choice["value"] for choice in listed]


def test_with_no_live_queue_at_start_up_the_bot_offers_the_training_queue(
    api_url: str, redis_url: str
) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
            options = command_options(h.fake)
            assert choices(options["queue"]) == ["training"]

    asyncio.run(scenario())
