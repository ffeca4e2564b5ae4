"""The bot's edges: an evaluation that failed, a link the API cannot sign or users cannot reach, a press
that breaks, a run that ends between a button's look at it and its cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from schemas.events import EvalFailed
from scripts import devstack
from tests.bot_support import USER, bot_on, serve_api
from tests.conftest import DispatchRecorder
from tests.fake_discord import Scripted, serve
from tests.test_bot_client import ORDER
from trainer_bot import embeds
from trainer_bot.app import connect_redis, download_linker
from trainer_bot.buttons import Buttons, Reply
from trainer_bot.live import LiveMessages
from trainer_bot.sinks import ConsoleSink, SentMessage
from trainer_client.client import ApiError, RunInfo, TrainerClient
from trainer_store.runs import RunStore
from trainer_store.settings import Settings


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(replace(settings, link_secret=None), dispatched) as url:
        yield url


def test_a_failed_evaluation_says_whose_problem_it_is() -> None:
    event = EvalFailed(
        request_id="r", run_id="r", user_id=USER, split="test", error_kind="system", message="worker died"
    )
    message = embeds.evaluated(event)
    assert message.embed.title == "Evaluation on the test split failed"
    assert "on our side" in str(message.embed.description)
    assert message.embed.fields[0].value == "worker died"
    assert embeds.parse_custom_id("someone-else:cancel:r") is None
    assert embeds.parse_custom_id("trainer:cancel:") is None


def test_without_a_link_secret_the_completed_dm_goes_without_a_link(api_url: str) -> None:
    link = download_linker(TrainerClient(api_url), "https://trainer.example", 3600)

    async def main() -> embeds.Download | None:
        return await link("no-such-run")

    assert asyncio.run(main()) is None


def test_the_console_shows_button_changes_and_a_press_that_breaks_is_answered(
    api_url: str, redis_url: str
) -> None:
    printed: list[str] = []
    sink = ConsoleSink(printed.append)

    async def main() -> None:
        await sink.set_buttons(SentMessage(1, 2), (embeds.cancel_button("r", disabled=True),))
        await sink.set_buttons(SentMessage(1, 2), ())
        live = LiveMessages(connect_redis(redis_url), sink)
        broken = TrainerClient("http://127.0.0.1:9/")  # nothing listens on the discard port
        reply = await Buttons(broken, live, sink).press(USER, "cancel", "r", "k")
        raise AssertionError(reply)

    with pytest.raises(Exception, match="UNREACHABLE"):
        asyncio.run(main())
    assert printed == [
        "--- DM to user 1 (message 2, buttons) ---\n[Cancel (disabled)]",
        "--- DM to user 1 (message 2, buttons) ---\n[no buttons]",
    ]


def test_without_a_public_address_the_completed_dm_goes_without_a_link(
    settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> None:
    with serve_api(replace(settings, link_secret="link-secret"), dispatched) as url:
        api = TrainerClient(url)
        run_id = api.train(ORDER).run_id

        async def main() -> tuple[embeds.Download | None, embeds.Download | None]:
            private = await download_linker(api, None, 3600)(run_id)
            public = await download_linker(api, "https://trainer.example", 3600)(run_id)
            return private, public

        private, public = asyncio.run(main())
    # The API could sign one; a link to an address users cannot reach would be no use to them.
    assert private is None
    assert public is not None
    assert public.url.startswith(f"https://trainer.example/runs/{run_id}/model.zip?expires=")


class Racing(TrainerClient):
    """The real client, with something happening to the run between a button's look at it and what
    the button does next: the race a user meets when a run ends just as they press Cancel."""

    def __init__(self, base_url: str, meanwhile: Callable[[str], object]) -> None:
        super().__init__(base_url)
        self._meanwhile = meanwhile
        self.looks = 0

    def run(self, run_id: str) -> RunInfo:
        self.looks += 1
        found = super().run(run_id)
        if self.looks == 1:
            self._meanwhile(run_id)
        return found


def press_cancel(api: TrainerClient, redis_url: str, run_id: str) -> Reply:
    async def main() -> Reply:
        sink = ConsoleSink(lambda _: None)
        return await Buttons(api, LiveMessages(connect_redis(redis_url), sink), sink).press(
            USER, "cancel", run_id, "k"
        )

    return asyncio.run(main())


def test_a_cancel_that_meets_a_run_just_ended_says_how_it_ended(
    settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder, redis_url: str
) -> None:
    store = RunStore(redis_client)

    def worker_finishes(run_id: str) -> None:
        assert store.claim(run_id, "worker-a", 60, time.time())
        assert store.finish(run_id, "completed", "done", time.time())

    with serve_api(settings, dispatched) as url:
        api = Racing(url, worker_finishes)
        run_id = api.train(ORDER).run_id
        reply = press_cancel(api, redis_url, run_id)
    # The look saw it queued; the API's 409 said it had ended: the reply says how, as it is now.
    assert reply == Reply(
        f"Run `{run_id}` has already ended (completed); there is nothing to cancel.",
        stale_buttons=(embeds.cancel_button(run_id, disabled=True),),
    )
    assert api.looks == 2, "the look, then the look after the 409"


def test_a_cancel_the_api_cannot_carry_out_is_the_apis_error(
    settings: Settings, dispatched: DispatchRecorder, redis_url: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "api-redis"
    workdir.mkdir()
    api_redis, api_redis_url = devstack.start_redis(workdir)
    with ExitStack() as stack:
        stack.callback(api_redis.stop)
        url = stack.enter_context(serve_api(replace(settings, redis_url=api_redis_url), dispatched))
        # The API's Redis goes away between the look and the cancel.
        api = Racing(url, lambda _: api_redis.stop())
        run_id = api.train(ORDER).run_id
        with pytest.raises(ApiError) as raised:
            press_cancel(api, redis_url, run_id)
    # The error is the cancel's own: the bot did not go on to look again as if the run had ended.
    assert (raised.value.status, raised.value.code, api.looks) == (503, "SERVICE_UNAVAILABLE", 1)


def test_a_press_that_breaks_on_our_side_is_answered_and_a_vanished_message_is_let_be(
    api_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "bot-redis"
    workdir.mkdir()
    bot_redis, bot_redis_url = devstack.start_redis(workdir)
    run_ids: list[str] = []

    async def main() -> None:
        async with serve() as fake, bot_on(fake, api_url, bot_redis_url, train_cooldown_s=0.0):
            queued = await fake.answer_to(
                await fake.use_command("train_model", USER, corpus_name="notes.txt")
            )
            run_ids.append(queued.split("`")[1])
            live_id = max(fake.messages)

            # The pressed message is gone by the time its button would be disabled: the answer stands.
            fake.scripted.append(
                Scripted("PATCH", f"/messages/{live_id}", 404, {"code": 10008, "message": "Unknown Message"})
            )
            gone = await fake.press(live_id, "trainer:cancel:no-such-run", USER)
            assert await fake.answer_to(gone) == "Run `no-such-run` no longer exists."
            deadline = time.monotonic() + 30
            while [r.status for r in fake.of("PATCH", f"/messages/{live_id}")] != [404]:
                assert time.monotonic() < deadline, "the bot never tried to disable the button"
                await asyncio.sleep(0.01)

            # The bot's own Redis goes away: Train again cannot open the new run's live message.
            await asyncio.to_thread(bot_redis.stop)
            broken = await fake.answer_to(await fake.press(live_id, f"trainer:retry:{run_ids[0]}", USER))
            assert broken.startswith("Something went wrong on our side at "), broken
            assert broken.endswith(" UTC; please try again.")
            assert len(fake.messages) == 1, "no live message for a run the bot could not follow"

    try:
        asyncio.run(main())
    finally:
        bot_redis.stop()
    assert f"button retry on run {run_ids[0]} failed" in caplog.text
    # Neither press escaped the handler into nextcord's "Ignoring exception in on_interaction".
    assert "Ignoring exception" not in capsys.readouterr().err
