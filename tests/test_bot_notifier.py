"""Events to DMs: real Redis streams, nextcord's real HTTP client, a local fake Discord."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import nextcord
import pytest
import redis

from schemas.events import EVENTS_STREAM, TrainCompleted, TrainStarted
from scripts.devstack import free_port
from tests.bot_support import PNG, USER, FakeClock, Publisher
from tests.fake_discord import (
    RATE_LIMITED_HEADERS,
    FakeDiscord,
    Scripted,
    buttons_of,
    dm_channel_id,
    fake_discord,
    field_values,
    first_embed,
)
from trainer_bot import embeds
from trainer_bot.app import connect_redis
from trainer_bot.embeds import DirectMessage, Download
from trainer_bot.live import LiveMessages, run_state_key
from trainer_bot.notifier import ATTEMPTS_KEY, GROUP, PARKED_STREAM, Notifier, NotifierSettings, sent_key
from trainer_bot.sinks import ConsoleSink, DiscordSink
from trainer_store.metrics import METRICS_KEY

SETTINGS = NotifierSettings(consumer="bot-1", block_ms=1, recover_interval_s=3600, max_attempts=3)


def make_notifier(
    redis_url: str,
    client: nextcord.Client,
    clock: FakeClock,
    settings: NotifierSettings = SETTINGS,
    loss_curve: bytes | None = PNG,
) -> Notifier:
    async def read_loss_curve(run_id: str) -> bytes | None:
        return loss_curve

    return Notifier(connect_redis(redis_url), DiscordSink(client), read_loss_curve, settings, clock=clock)


def pending(redis_client: redis.Redis) -> int:
    summary = redis_client.xpending(EVENTS_STREAM, GROUP)
    return int(summary["pending"])


Scenario = Callable[[FakeDiscord, Notifier, FakeClock], Awaitable[None]]
CLIENTS: list[nextcord.Client] = []


def run_with(redis_url: str, scenario: Scenario, settings: NotifierSettings = SETTINGS) -> None:
    async def main() -> None:
        async with fake_discord() as (fake, client):
            CLIENTS[:] = [client]  # for a scenario that starts a second bot on the same Discord
            clock = FakeClock()
            notifier = make_notifier(redis_url, client, clock, settings)
            await notifier.step()  # creates the consumer group before anything is published
            await scenario(fake, notifier, clock)

    asyncio.run(main())


def test_a_runs_events_edit_its_live_message_and_its_end_is_one_dm(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)
    other = Publisher(redis_client)
    canceled = Publisher(redis_client)

    async def download(run_id: str) -> Download | None:
        return Download(
            f"https://trainer.example/runs/{run_id}/model.zip?expires=9&signature=s", 1_800_000_000
        )

    async def scenario(fake: FakeDiscord, _: Notifier, clock: FakeClock) -> None:
        notifier = Notifier(
            connect_redis(redis_url), DiscordSink(CLIENTS[0]), curve, SETTINGS, download=download, clock=clock
        )
        run.started()
        run.progress(50)
        run.completed()
        other.failed(error_kind="system")
        canceled.failed(status="canceled")
        await notifier.step()

        assert len(fake.of("POST", "/users/@me/channels")) == 1, "the DM channel is asked for once"
        assert fake.of("POST", "/users/@me/channels")[0].body == {"recipient_id": USER}
        titles = [embed["title"] for embed in fake.sent_embeds()]
        assert titles == ["Training started", "Training completed", "Training failed", "Training canceled"]
        live_id = min(fake.messages)
        started, completed, failed, canceled_embed = fake.sent_embeds()
        assert field_values(started)["Resources"] == "2 CPU cores, 4,096 MB memory, 2 threads"
        assert field_values(started)["Epochs"] == "2"
        assert "gpt2 tiny" in str(started["description"])
        # The progress waited for the edit interval; the end writes it at once, marked ended.
        [edit] = fake.of("PATCH", f"/messages/{live_id}")
        ended = first_embed(edit)
        values = field_values(ended)
        assert (values["Epoch"], values["Step"], values["Loss"]) == ("1/2", "50", "3.5000")
        assert (values["Tokens/s"], values["ETA"]) == ("8,912", "30s")
        # 50 s done of 80 s in all: the bar shows 62 %.
        assert "62%" in str(ended["description"])
        assert ended["title"] == "Training completed"
        assert buttons_of(edit) == [("Cancel", f"trainer:cancel:{run.run_id}", True)]
        values = field_values(completed)
        assert values["Perplexity"] == "9.49"
        assert values["Parameters"] == "1,461,760"
        assert values["Duration"] == "2m 05s"
        assert "the cat sat on the mat" in values["Sample"]
        assert values["Download"] == (
            f"[model.zip](https://trainer.example/runs/{run.run_id}/model.zip?expires=9&signature=s), "
            "works until <t:1800000000:f>"
        )
        assert completed["image"] == {"url": "attachment://loss_curve.png"}
        with_file = fake.of("POST", "/messages")[1]
        assert with_file.files == {"loss_curve.png": PNG}
        assert [label for label, _, _ in buttons_of(with_file)] == ["Train again"]
        assert "on our side" in str(failed["description"])
        assert "too small" in field_values(failed)["Message"]
        assert canceled_embed["colour" if "colour" in canceled_embed else "color"] != failed.get("color")
        assert "canceled" in str(canceled_embed["description"])
        # Runs whose live message this bot never made get no message just to say they ended.
        assert len(fake.of("PATCH", "/messages/")) == 1
        assert pending(redis_client) == 0
        # Counted for /metrics: the four one-off DMs (the progress message is edited in place).
        assert redis_client.hget(METRICS_KEY, "bot_dms_sent") == b"4"

    run_with(redis_url, scenario)


async def curve(run_id: str) -> bytes | None:
    return PNG


def test_progress_is_one_message_edited_at_most_once_per_interval(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        run.progress(10)
        await notifier.step()
        assert len(fake.of("POST", "/messages")) == 1
        message_path = f"/messages/{next(iter(fake.messages))}"

        # Three more arrive within the interval: nothing is written yet, and only the newest waits.
        for step in (20, 30, 40):
            run.progress(step)
            clock.advance(0.5)
            await notifier.step()
        assert fake.of("PATCH", "/messages/") == []
        assert pending(redis_client) == 1

        clock.advance(2.0)  # 3.5 s after the first write: the interval (3 s) has passed
        await notifier.step()
        edits = fake.of("PATCH", message_path)
        assert len(edits) == 1
        assert field_values(first_embed(edits[0]))["Step"] == "40"
        assert len(fake.of("POST", "/messages")) == 1, "still one progress message"
        assert pending(redis_client) == 0

        run.progress(50)
        await notifier.step()
        assert len(fake.of("PATCH", message_path)) == 1
        run.completed()  # the end writes the waiting progress at once: the message shows the last state
        await notifier.step()
        edits = fake.of("PATCH", message_path)
        assert len(edits) == 2
        assert field_values(first_embed(edits[1]))["Step"] == "50"
        assert pending(redis_client) == 0

    run_with(redis_url, scenario)


def test_a_start_that_beats_the_queuing_command_and_has_no_time_keeps_one_live_message(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, _: Notifier, clock: FakeClock) -> None:
        sink = DiscordSink(CLIENTS[0])
        live = LiveMessages(connect_redis(redis_url), sink)
        notifier = Notifier(connect_redis(redis_url), sink, curve, SETTINGS, clock=clock, live=live)
        # The worker starts the run before the command that queued it writes its message, and sends
        # no `ts` (optional on the v1 wire): the run is followed all the same.
        run.send(
            TrainStarted(
                request_id=run.run_id,
                run_id=run.run_id,
                user_id=USER,
                model_family="gpt2",
                model_size="tiny",
                total_epochs=2,
                queue="training",
            )
        )
        await notifier.step()
        assert redis_client.hexists(run_state_key(run.run_id), "started_ts") is False
        queued = embeds.queued(embeds.QueuedRun(run.run_id, "gpt2", "tiny", 2, 8, 1e-3, corpus="notes.txt"))
        await live.open(USER, run.run_id, queued, test_split=True)
        assert [embed["title"] for embed in fake.sent_embeds()] == ["Training started"]
        assert fake.of("PATCH", "/messages/") == [], "the queued state never overwrites a started run"

        run.progress(150, eta_s=30.0)  # epoch 2 of 2, 150 s after a start nobody timed
        clock.advance(10.0)
        await notifier.step()
        [edit] = fake.of("PATCH", f"/messages/{min(fake.messages)}")
        # Without a start time the bar shows finished epochs (1 of 2), not elapsed over total time.
        assert "50%" in str(first_embed(edit)["description"])
        assert field_values(first_embed(edit))["ETA"] == "30s"

        run.completed()
        await notifier.step()
        titles = [embed["title"] for embed in fake.sent_embeds()]
        assert titles == ["Training started", "Training completed"]
        # The command's word that the run kept a test split survived the message it did not send.
        done = fake.of("POST", "/messages")[-1]
        assert [label for label, _, _ in buttons_of(done)] == ["Evaluate on test split", "Train again"]

    run_with(redis_url, scenario)


def test_a_restarted_bot_sends_each_dm_once_and_collapses_progress(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        run.started()
        run.progress(10)
        await notifier.step()
        progress_id = max(fake.messages)
        # The bot goes down; a whole run's worth of events arrives meanwhile, and one entry it had
        # read (and sent) but not acknowledged stays pending: the window that may repeat a DM.
        for step in range(20, 200, 10):
            run.progress(step)
        run.completed()
        read = redis_client.xreadgroup(GROUP, "bot-1", {EVENTS_STREAM: ">"}, count=1)
        assert read

        before = len(fake.requests)
        restarted = make_notifier(redis_url, CLIENTS[0], FakeClock())
        await restarted.step()
        await restarted.step()
        after = fake.requests[before:]
        titles = [first_embed(r)["title"] for r in after if r.method == "POST" and "/messages" in r.path]
        assert titles == ["Training completed"], "no second started DM, no second progress message"
        edits = [r for r in after if r.method == "PATCH"]
        assert {e.path.rsplit("/", 1)[1] for e in edits} == {str(progress_id)}
        # The entry left pending is re-read first; the rest collapse into the final state.
        assert [field_values(first_embed(e))["Step"] for e in edits] == ["20", "190"]
        assert pending(redis_client) == 0

        # Another restart re-reads nothing and sends nothing.
        before = len(fake.requests)
        await make_notifier(redis_url, CLIENTS[0], FakeClock()).step()
        assert [r.method for r in fake.requests[before:]] == []

    run_with(redis_url, scenario)


def test_a_dm_recorded_as_sent_is_not_sent_again(redis_url: str, redis_client: redis.Redis) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        event = run.completed()
        assert event.event_id is not None
        redis_client.set(sent_key(event.event_id), "1")
        await notifier.step()
        assert fake.of("POST", "/messages") == []
        assert pending(redis_client) == 0
        assert redis_client.ttl(sent_key(event.event_id)) == -1, "the test's own key, untouched"

    run_with(redis_url, scenario)


def test_closed_dms_are_logged_and_acknowledged_not_retried(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    run = Publisher(redis_client)
    settings = NotifierSettings(consumer="bot-1", block_ms=1, recover_interval_s=0)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        fake.scripted.append(
            Scripted(
                "POST", "/messages", 403, {"code": 50007, "message": "Cannot send messages to this user"}
            )
        )
        run.started()
        await notifier.step()
        await notifier.step()  # a recovery round finds nothing left to retry
        assert len(fake.of("POST", "/messages")) == 1
        assert pending(redis_client) == 0
        assert "does not accept direct messages" in caplog.text
        assert redis_client.hmget(METRICS_KEY, ["bot_dms_refused", "bot_dms_sent"]) == [b"1", None]

    run_with(redis_url, scenario, settings)


def test_a_rate_limit_is_waited_out_by_nextcord_and_the_dm_sent_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        fake.scripted.append(
            Scripted(
                "POST",
                "/messages",
                429,
                {"message": "You are being rate limited.", "retry_after": 0.01, "global": False},
                headers=RATE_LIMITED_HEADERS,
            )
        )
        run.started()
        await notifier.step()
        assert len(fake.of("POST", "/messages")) == 2
        assert len(fake.messages) == 1
        assert pending(redis_client) == 0

    run_with(redis_url, scenario)


def test_an_event_that_keeps_failing_stays_pending_then_is_parked(
    redis_url: str, redis_client: redis.Redis
) -> None:
    doomed = Publisher(redis_client)
    fine = Publisher(redis_client, user_id=USER + 1)
    settings = NotifierSettings(consumer="bot-1", block_ms=1, recover_interval_s=10, max_attempts=3)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        doomed_channel = f"/channels/{dm_channel_id(USER)}/messages"
        fake.scripted.append(
            Scripted("POST", doomed_channel, 400, {"code": 50035, "message": "Invalid Form"}, times=9)
        )
        entry = doomed.started()
        fine.started()
        await notifier.step()
        assert len(fake.messages) == 1, "the entry behind the failing one is not held up"
        assert pending(redis_client) == 1
        clock.advance(10)
        await notifier.step()  # second try, at the next recovery
        assert pending(redis_client) == 1
        clock.advance(10)
        await notifier.step()  # third try: parked
        assert len(fake.of("POST", doomed_channel)) == 3
        assert pending(redis_client) == 0
        parked = redis_client.xrange(PARKED_STREAM)
        assert parked is not None
        assert len(parked) == 1
        _, raw = parked[0]
        assert raw is not None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        assert entry.event_id is not None
        assert entry.event_id in fields["event"]
        assert "Invalid Form" in fields["reason"]
        assert not redis_client.hexists(ATTEMPTS_KEY, fields["entry_id"])
        assert redis_client.hmget(METRICS_KEY, ["bot_dms_parked", "bot_dms_sent"]) == [b"1", b"1"]

    run_with(redis_url, scenario, settings)


def test_malformed_entries_and_events_of_no_user_are_skipped_and_acknowledged(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        redis_client.xadd(EVENTS_STREAM, {"event": '{"type":"trainer.train.started.v1"}'})
        redis_client.xadd(EVENTS_STREAM, {"something": "else"})
        Publisher(redis_client, user_id=0).started()
        await notifier.step()
        assert fake.requests[1:] == []  # nothing after the login
        assert pending(redis_client) == 0
        assert "lacks field" in caplog.text
        assert "no 'event' field" in caplog.text

    run_with(redis_url, scenario)


def test_a_deleted_progress_message_is_sent_anew(redis_url: str, redis_client: redis.Redis) -> None:
    run = Publisher(redis_client)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        run.progress(10)
        await notifier.step()
        fake.messages.clear()  # the user deleted it
        clock.advance(5)
        run.progress(20)
        await notifier.step()
        assert len(fake.of("PATCH", "/messages/")) == 1
        assert len(fake.of("POST", "/messages")) == 2
        clock.advance(5)
        run.progress(30)
        await notifier.step()
        assert fake.of("PATCH", "/messages/")[-1].path.endswith(f"/{max(fake.messages)}")

    run_with(redis_url, scenario)


def test_entries_a_dead_consumer_left_are_claimed_even_trimmed_ones(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)
    # One entry per read, so both the own-pending and the claim loops page.
    settings = NotifierSettings(consumer="bot-2", block_ms=1, recover_interval_s=0, claim_idle_s=0, batch=1)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        run.started()
        trimmed = redis_client.xadd(EVENTS_STREAM, {"event": "{}"})
        # Another bot read both and died; one entry has since been trimmed from the stream.
        assert redis_client.xreadgroup(GROUP, "bot-dead", {EVENTS_STREAM: ">"})
        redis_client.xdel(EVENTS_STREAM, trimmed)
        await notifier.step()
        assert [e["title"] for e in fake.sent_embeds()] == ["Training started"]
        await notifier.step()  # the trimmed one comes back as an own pending entry without fields
        assert pending(redis_client) == 0

    run_with(redis_url, scenario, settings)


def test_a_lost_redis_is_retried_with_exponential_backoff() -> None:
    delays: list[float] = []
    stop = asyncio.Event()

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 5:
            stop.set()

    async def no_curve(run_id: str) -> bytes | None:
        return None

    async def main() -> None:
        settings = NotifierSettings(backoff_initial_s=0.5, backoff_max_s=3.0)
        client = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
        await Notifier(client, ConsoleSink(), no_curve, settings, sleep=sleep).run(stop)

    asyncio.run(main())
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_the_loop_resets_its_backoff_and_stops_when_asked(redis_url: str, redis_client: redis.Redis) -> None:
    printed: list[str] = []
    stop = asyncio.Event()

    async def no_curve(run_id: str) -> bytes | None:
        return None

    async def main() -> None:
        notifier = Notifier(
            connect_redis(redis_url), ConsoleSink(printed.append), no_curve, NotifierSettings(block_ms=5)
        )
        await notifier.step()
        Publisher(redis_client).started()
        task = asyncio.create_task(notifier.run(stop))
        while not printed:
            await asyncio.sleep(0.005)
        stop.set()
        await task

    asyncio.run(main())
    assert printed[0].startswith(f"--- DM to user {USER} (message 1) ---\n# Training started")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_other_forbidden_answers_are_retried_and_an_older_progress_is_dropped(
    redis_url: str, redis_client: redis.Redis
) -> None:
    run = Publisher(redis_client)
    settings = NotifierSettings(consumer="bot-1", block_ms=1, recover_interval_s=10)

    async def scenario(fake: FakeDiscord, notifier: Notifier, clock: FakeClock) -> None:
        fake.scripted.append(Scripted("POST", "/messages", 403, {"code": 50001, "message": "Missing Access"}))
        run.progress(10)
        await notifier.step()
        assert pending(redis_client) == 1, "a 403 other than 50007 may pass: it stays pending"
        clock.advance(5)
        run.progress(20)
        await notifier.step()
        assert len(fake.messages) == 1
        clock.advance(10)
        await notifier.step()  # recovery re-reads the older progress: acknowledged, not written
        assert len(fake.of("POST", "/messages")) == 2
        assert fake.of("PATCH", "/messages/") == []
        assert pending(redis_client) == 0

    run_with(redis_url, scenario, settings)


def test_a_stream_key_of_another_type_is_an_error_not_a_retry(
    redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.set(EVENTS_STREAM, "not a stream")

    async def main() -> None:
        async with fake_discord() as (_, client):
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await make_notifier(redis_url, client, FakeClock()).step()

    asyncio.run(main())


def test_the_console_shows_edits_and_attachments() -> None:
    printed: list[str] = []
    sink = ConsoleSink(printed.append)
    run_id = "r1"
    completed = TrainCompleted(
        request_id=run_id, run_id=run_id, user_id=USER, loss=2.0, perplexity=7.39, artifact_path="/a"
    )
    bare = embeds.completed(completed, loss_curve=None, download=None)
    assert field_values(dict(bare.embed.to_dict().items())) == {
        "Validation loss": "2.0000",
        "Perplexity": "7.39",
    }
    assert bare.attachment is None
    started = TrainStarted(
        request_id=run_id,
        run_id=run_id,
        user_id=USER,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=1,
        queue="q",
    )
    assert field_values(dict(embeds.started(started).embed.to_dict().items())) == {
        "Epochs": "1",
        "Queue": "q",
    }
    taken = dataclasses.replace(started, worker="gpu@box-1")
    assert field_values(dict(embeds.started(taken).embed.to_dict().items()))["Worker"] == "gpu@box-1"

    async def main() -> None:
        sent = await sink.send(USER, embeds.completed(completed, loss_curve=PNG, download=None))
        await sink.edit(sent, DirectMessage(nextcord.Embed(title="Plain")))

    asyncio.run(main())
    assert printed[0].endswith(f"[attached loss_curve.png, {len(PNG)} bytes]\n[Train again]")
    assert printed[1] == f"--- DM to user {USER} (message 1, edited) ---\n# Plain"
