"""What Discord refuses, refused by the fake and respected by the bot: sizes, deadlines, rate limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nextcord
import pytest
import redis

from schemas.events import EVENTS_STREAM, TrainCompleted, TrainFailed
from tests.bot_support import OTHER_USER, USER, Publisher, bot_on, serve_api
from tests.conftest import DispatchRecorder
from tests.fake_discord import Limits, dm_channel_id, fake_discord, field_values, first_embed, serve
from trainer_bot import embeds
from trainer_bot.app import connect_redis
from trainer_bot.notifier import GROUP, Notifier, NotifierSettings
from trainer_bot.sinks import DiscordSink
from trainer_store.settings import Settings

HUGE = "word " * 3000


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(settings, dispatched) as url:
        yield url


def test_the_fake_refuses_what_discord_refuses_and_the_bot_clips_to_fit(redis_client: redis.Redis) -> None:
    async def main() -> None:
        async with fake_discord() as (fake, client):
            channel = client.get_partial_messageable(dm_channel_id(USER), type=nextcord.ChannelType.private)
            too_long = nextcord.Embed(title="t" * 257, description="d" * 4000)
            for index in range(26):
                too_long.add_field(name=f"n{index}", value="v" * 1025)
            with pytest.raises(nextcord.HTTPException) as refused:
                await channel.send(content="c" * 2001, embed=too_long)
            assert (refused.value.status, refused.value.code) == (400, 50035)

            sink = DiscordSink(client)
            queued = embeds.QueuedRun("r1", "gpt2", "tiny", 1, 8, 1e-3, corpus="corpus-" * 2000)
            completed = TrainCompleted(
                request_id="r1",
                run_id="r1",
                user_id=USER,
                loss=2.0,
                perplexity=7.4,
                artifact_path="/a",
                sample=HUGE,
            )
            failed = TrainFailed(
                request_id="r1", run_id="r1", user_id=USER, error_kind="user", message=HUGE, status="failed"
            )
            many = nextcord.Embed(title="x" * 300, description=HUGE)
            for _ in range(30):
                many.add_field(name="n" * 300, value=HUGE)
            for message in (
                embeds.queued(queued),
                embeds.completed(completed, loss_curve=None, download=None),
                embeds.failed(failed),
                embeds.DirectMessage(many),
            ):
                await sink.send(USER, message)
            sent = list(fake.of("POST", "/messages"))
            assert [r.status for r in sent] == [400, 200, 200, 200, 200]
            assert field_values(first_embed(sent[1]))["Corpus"].endswith("…")
            sample = field_values(first_embed(sent[2]))["Sample"]
            assert (len(sample), sample.endswith("…\n```")) == (1024, True)
            clipped = first_embed(sent[4])
            assert len(str(clipped["title"])) == 256
            fields = clipped["fields"]
            assert isinstance(fields, list)
            # The first fields are kept whole (clipped to a field's limit); the rest go to fit 6,000.
            assert [len(f["value"]) for f in fields] == [1024] * len(fields)
            total = len(str(clipped["title"])) + len(str(clipped["description"]))
            total += sum(len(f["name"]) + len(f["value"]) for f in fields)
            assert 5000 < total <= 6000

    asyncio.run(main())


def test_without_fields_to_drop_the_description_gives_way_and_a_title_alone_goes_as_it_is(
    redis_client: redis.Redis,
) -> None:
    async def main() -> None:
        async with fake_discord() as (fake, client):
            # Each part within its own limit, 6,400 characters in all: the fields go, then the description.
            crowded = nextcord.Embed(title="t" * 256, description="d" * 4096)
            crowded.set_footer(text="f" * 2048)
            crowded.add_field(name="Loss", value="2.0")
            sink = DiscordSink(client)
            await sink.send(USER, embeds.DirectMessage(crowded))
            await sink.send(USER, embeds.DirectMessage(nextcord.Embed(title="Only a title")))
            sent = fake.of("POST", "/messages")
            assert [r.status for r in sent] == [200, 200]
            clipped = first_embed(sent[0])
            assert (clipped["title"], clipped["footer"]) == ("t" * 256, {"text": "f" * 2048})
            assert not clipped.get("fields")
            assert clipped["description"] == "d" * (6000 - 256 - 2048 - 1) + "…"
            assert first_embed(sent[1]) == {"type": "rich", "title": "Only a title"}

    asyncio.run(main())


def test_a_burst_of_dms_beyond_the_rate_limits_arrives_whole_and_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    users = [USER + index for index in range(24)]
    # Each route has room to spare: the global bucket is the one the volume exhausts.
    limits = Limits(global_limit=8, global_window_s=0.5, route_limit=50, route_window_s=0.5)

    async def main() -> None:
        async with fake_discord(limits) as (fake, client):

            async def no_curve(run_id: str) -> bytes | None:
                return None

            settings = NotifierSettings(consumer="bot-burst", block_ms=1, recover_interval_s=0.2)
            notifier = Notifier(connect_redis(redis_url), DiscordSink(client), no_curve, settings)
            await notifier.step()
            for user in users:
                Publisher(redis_client, user_id=user).completed()
            while redis_client.xpending(EVENTS_STREAM, GROUP)["pending"] or len(fake.sent_embeds()) < len(
                users
            ):
                await notifier.step()
            delivered = [r.path for r in fake.of("POST", "/messages") if r.status == 200]
            assert sorted(delivered) == sorted(f"/channels/{dm_channel_id(user)}/messages" for user in users)
            assert any(is_global for _, is_global in fake.rate_limited), "the global bucket ran out"

    asyncio.run(main())


def test_an_interaction_answered_after_its_deadline_is_refused(api_url: str, redis_url: str) -> None:
    async def main() -> None:
        async with serve(Limits(interaction_deadline_s=0.0)) as fake, bot_on(fake, api_url, redis_url):
            asked = await fake.use_command("train_runs", USER)
            while not fake.callbacks(asked):
                await asyncio.sleep(0.01)
            late = fake.callbacks(asked)[0]
            assert late.status == 404
            await asyncio.sleep(0.2)
            assert fake.followup_of(asked) is None, "a follow-up needs an answered interaction"

    asyncio.run(main())


def test_buttons_refuse_others_and_say_when_they_no_longer_apply(api_url: str, redis_url: str) -> None:
    async def main() -> None:
        async with serve() as fake, bot_on(fake, api_url, redis_url, train_cooldown_s=0.0):
            queued = await fake.answer_to(
                await fake.use_command("train_model", USER, corpus_name="notes.txt")
            )
            run_id = queued.split("`")[1]
            live_id = max(fake.messages)
            assert first_embed(fake.messages[live_id])["title"] == "Training queued"

            async def press(custom_id: str, user: int = USER) -> str:
                return await fake.answer_to(await fake.press(live_id, custom_id, user))

            assert await press("trainer:explode:x") == "This button no longer does anything."
            assert await press(f"trainer:retry:{run_id}", OTHER_USER) == (
                "Only the person who started this run can use its buttons."
            )
            assert await press("trainer:cancel:no-such-run") == "Run `no-such-run` no longer exists."
            # A queued run trained without a test split: the API says why it cannot be evaluated.
            refused = await press(f"trainer:evaluate:{run_id}")
            assert refused.startswith("The training service answered VALIDATION_ERROR")
            assert await press(f"trainer:cancel:{run_id}") == (
                f"Cancellation requested for run `{run_id}`; it stops within a few seconds."
            )
            again = await press(f"trainer:retry:{run_id}")
            assert again.startswith("Training again: run `")
            assert len(fake.messages) == 2, "the new run has its own live message"

    asyncio.run(main())
