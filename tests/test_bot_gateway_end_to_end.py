"""The user's path: the real bot process on the fake Discord's gateway, the real API and workers."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import requests

from scripts import devstack
from tests.bot_support import COMMANDS, OTHER_USER, USER
from tests.conftest import Stack
from tests.fake_discord import (
    APPLICATION_ID,
    TOKEN,
    FakeDiscord,
    Recorded,
    buttons_of,
    dm_channel_id,
    field_values,
    first_embed,
    serve,
)
from tests.test_end_to_end import submit
from trainer_bot.buttons import NOT_YOURS

DM = f"/channels/{dm_channel_id(USER)}/messages"
LINK = re.compile(r"\[model\.zip\]\((?P<url>[^)]+)\), works until <t:(?P<expires>\d+):f>")


async def until(what: str, check: Callable[[], bool], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


def created(fake: FakeDiscord) -> list[tuple[int, Recorded]]:
    """The DMs to the user, in the order they were created."""
    return sorted((mid, r) for mid, r in fake.messages.items() if r.path == DM)


def edits_of(fake: FakeDiscord, message_id: int) -> list[str]:
    return [
        str(first_embed(r).get("title"))
        for r in fake.of("PATCH", f"{DM}/{message_id}")
        if r.status == 200 and r.body.get("embeds")
    ]


def run_status(stack: Stack, run_id: str) -> str:
    status: str = requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()["status"]
    return status


def custom_id(recorded: Recorded, label: str) -> str:
    return next(cid for name, cid, _ in buttons_of(recorded) if name == label)


def test_a_user_trains_downloads_trains_again_and_cancels_from_the_dms(stack: Stack, tmp_path: Path) -> None:
    asyncio.run(scenario(stack, tmp_path))


async def scenario(stack: Stack, tmp_path: Path) -> None:
    async with serve() as fake:
        env = {
            **stack.env,
            "TRAINER_API_URL": stack.api_url,
            "PUBLIC_API_URL": stack.api_url,
            "REDIS_URL": stack.redis_url,
            "DISCORD_TOKEN": TOKEN,
            "DISCORD_API_BASE": fake.api_base,
            "BOT_CONSUMER_NAME": "bot-gateway-e2e",
            "BOT_PROGRESS_EDIT_INTERVAL_S": "0.3",
        }
        bot = await asyncio.to_thread(devstack.start_procfile, "bot", env, tmp_path / "logs")
        try:
            await walk_through(fake, stack, tmp_path)
        finally:
            await asyncio.to_thread(bot.stop)
        assert bot.process.returncode == 0, bot.log()


async def walk_through(fake: FakeDiscord, stack: Stack, tmp_path: Path) -> None:
    # Connecting registers the commands: nothing but the gateway's READY made the bot do it.
    await fake.connected()
    await until("the commands are registered", lambda: set(fake.commands) == COMMANDS, 60)
    # No privileged intent (members 1 << 1, presences 1 << 8, message content 1 << 15).
    assert int(str(fake.identifies[0]["intents"])) & (1 << 1 | 1 << 8 | 1 << 15) == 0
    registered = fake.of("POST", f"/applications/{APPLICATION_ID}/commands")
    assert {str(r.body["name"]) for r in registered} == COMMANDS
    listed = fake.commands["train_model"]["options"]
    assert isinstance(listed, list)
    options = {str(option["name"]) for option in listed}
    assert {"family", "size", "corpus_file", "test_fraction"} <= options

    # Discord asks the bot to reconnect: it resumes the same session and registers nothing again.
    await fake.reconnect()
    await fake.connected()
    assert fake.session is not None
    assert fake.resumes[-1]["session_id"] == fake.session.session_id
    assert len(fake.identifies) == 1

    corpus = (stack.corpus_root / "stories.txt").read_bytes()
    fake.cdn["stories.txt"] = corpus
    attachment = {
        "id": "1",
        "filename": "stories.txt",
        "size": len(corpus),
        "url": f"{fake.base_url}/cdn/stories.txt",
        "proxy_url": "",
        "content_type": "text/plain; charset=utf-8",
    }
    asked = await fake.use_command(
        "train_model", USER, corpus_file=attachment, size="tiny", epochs=1, batch_size=8, test_fraction=0.2
    )
    reply = await fake.answer_to(asked)
    assert reply.startswith("Training queued: run `"), reply
    assert [r.body for r in fake.callbacks(asked)] == [{"type": 5, "data": {"flags": 64}}]
    run_id = reply.split("`")[1]

    # One live message, created queued, then edited in place until the run ends.
    await until("the completed DM", lambda: len(created(fake)) > 1)
    (live_id, _), (done_id, done) = created(fake)
    assert first_embed(done)["title"] == "Training completed"
    assert first_embed(fake.of("POST", DM)[0]).get("title") == "Training queued"
    await until("the live message's last edit", lambda: buttons_of(fake.messages[live_id])[0][2])
    edits = edits_of(fake, live_id)
    assert edits[0] == "Training started"
    assert "Training in progress" in edits
    assert edits[-1] == "Training completed"
    assert buttons_of(fake.messages[live_id]) == [("Cancel", f"trainer:cancel:{run_id}", True)]

    # The completed DM: the loss curve, and a link that downloads the model with no header at all.
    assert done.files["loss_curve.png"].startswith(b"\x89PNG")
    assert first_embed(done)["image"] == {"url": "attachment://loss_curve.png"}
    found = LINK.fullmatch(field_values(first_embed(done))["Download"])
    assert found is not None
    assert int(found["expires"]) >= time.time() + 7 * 24 * 3600 - 120
    download = await asyncio.to_thread(requests.get, found["url"], timeout=60)
    assert download.status_code == 200
    assert int(download.headers["Content-Length"]) == len(download.content)
    folder = tmp_path / "model"
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(folder)
    loaded = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoModelForCausalLM as M; "
            "print(M.from_pretrained(sys.argv[1]).num_parameters())",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert int(loaded.stdout.strip()) > 0
    tampered = found["url"].replace("expires=", "expires=1")
    assert (await asyncio.to_thread(requests.get, tampered, timeout=30)).status_code == 403
    assert [name for name, _, _ in buttons_of(done)] == ["Evaluate on test split", "Train again"]

    # Evaluate on test split: the light worker evaluates, and the result comes as a DM.
    pressed = await fake.press(done_id, custom_id(done, "Evaluate on test split"), USER)
    assert (await fake.answer_to(pressed)).startswith(f"Evaluating run `{run_id}` on its test split")
    await until("the evaluation DM", lambda: len(created(fake)) > 2)
    evaluation = first_embed(created(fake)[2][1])
    assert evaluation["title"] == "Evaluation on the test split"
    assert float(field_values(evaluation)["Loss"]) > 0

    # A long run of another user holds the one training slot, so the run trained again stays queued
    # until the owner cancels it, however fast this machine trains.
    blocker = await asyncio.to_thread(submit, stack, user_id=0, num_epochs=100)
    await until("the long run trains", lambda: run_status(stack, blocker) == "running", 60)

    # Train again: a new run of the same request, with its own live message, queued.
    pressed = await fake.press(done_id, custom_id(done, "Train again"), USER)
    again_reply = await fake.answer_to(pressed)
    assert again_reply.startswith("Training again: run `"), again_reply
    again = again_reply.split("`")[1]
    assert again != run_id
    await until("the new live message", lambda: len(created(fake)) > 3)
    again_id, again_live = created(fake)[3]
    assert first_embed(fake.of("POST", DM)[3])["title"] == "Training queued"
    assert f"`{again}`" in str(first_embed(again_live)["description"])

    # Someone else's press is refused and changes nothing; the owner's cancels the run.
    pressed = await fake.press(again_id, f"trainer:cancel:{again}", OTHER_USER)
    assert await fake.answer_to(pressed) == NOT_YOURS
    assert await asyncio.to_thread(run_status, stack, again) == "queued"
    pressed = await fake.press(again_id, f"trainer:cancel:{again}", USER)
    assert (await fake.answer_to(pressed)).startswith(f"Cancellation requested for run `{again}`")
    # The queued run ends at once (the light worker ends it): its DM comes while the long run still
    # holds the training slot.
    await until("the canceled DM", lambda: len(created(fake)) > 4)
    assert await asyncio.to_thread(run_status, stack, blocker) == "running"
    canceled = created(fake)[4][1]
    assert first_embed(canceled)["title"] == "Training canceled"
    assert [name for name, _, _ in buttons_of(canceled)] == ["Train again"]
    await until("Cancel disabled", lambda: buttons_of(fake.messages[again_id])[0][2])

    # A stale button: the run has ended, so pressing Cancel says so and leaves it disabled.
    pressed = await fake.press(again_id, f"trainer:cancel:{again}", USER)
    assert "has already ended (canceled)" in await fake.answer_to(pressed)
    canceled_blocker = await asyncio.to_thread(
        requests.post, f"{stack.api_url}/runs/{blocker}/cancel", timeout=10
    )
    assert canceled_blocker.status_code == 202
    await until("the long run ends", lambda: run_status(stack, blocker) == "canceled", 60)
    # The queued run's own delivery, taken once the slot freed, found it ended and trained nothing.
    assert run_status(stack, again) == "canceled"
    # Every interaction was answered in time, exactly once.
    assert all(r.status == 204 for r in fake.of("POST", "/interactions/"))
