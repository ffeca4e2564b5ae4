"""The buttons on a run's DMs: Cancel, Evaluate on test split, Train again; only the run's owner may press."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nextcord

from trainer_bot.commands import api_error_text, caller_id, failure_text
from trainer_bot.embeds import Action, Button, cancel_button, parse_custom_id, queued_again
from trainer_bot.live import LiveMessages
from trainer_bot.sinks import DmSink, MessageGone, SentMessage
from trainer_client.client import ApiError, RunInfo, TrainerClient

log = logging.getLogger(__name__)

NOT_YOURS = "Only the person who started this run can use its buttons."


@dataclass(frozen=True)
class Reply:
    text: str
    # The pressed button no longer applies: the message is edited to show it disabled.
    stale_buttons: tuple[Button, ...] | None = None


class Buttons:
    """What each button does, apart from Discord: who pressed what on which run in, a reply out."""

    def __init__(self, api: TrainerClient, live: LiveMessages, sink: DmSink) -> None:
        self._api = api
        self._live = live
        self._sink = sink

    async def handle(self, interaction: nextcord.Interaction[nextcord.Client]) -> None:
        """Defer at once (Discord waits 3 s at most), act, then answer privately."""
        await interaction.response.defer(ephemeral=True, with_message=True)
        parsed = parse_custom_id(custom_id_of(interaction))
        if parsed is None:
            await interaction.followup.send("This button no longer does anything.", ephemeral=True)
            return
        action, run_id = parsed
        try:
            reply = await self.press(caller_id(interaction), action, run_id, str(interaction.id))
        except ApiError as exc:
            reply = Reply(api_error_text(exc))
        except Exception:
            log.exception("button %s on run %s failed", action, run_id)
            reply = Reply(failure_text())
        await interaction.followup.send(reply.text, ephemeral=True)
        message = interaction.message
        if reply.stale_buttons is not None and message is not None:
            try:
                await self._sink.set_buttons(SentMessage(message.channel.id, message.id), reply.stale_buttons)
            except MessageGone:
                return

    async def press(self, user_id: int, action: Action, run_id: str, request_key: str) -> Reply:
        try:
            run = await asyncio.to_thread(self._api.run, run_id)
        except ApiError as exc:
            if exc.code != "NOT_FOUND":
                raise
            return Reply(f"Run `{run_id}` no longer exists.", stale_buttons=())
        if run.user_id != user_id:
            return Reply(NOT_YOURS)
        if action == "cancel":
            return await self._cancel(run)
        if action == "evaluate":
            return await self._evaluate(run, request_key)
        return await self._retry(run, request_key)

    async def _cancel(self, run: RunInfo) -> Reply:
        if run.status not in ("queued", "running"):
            return Reply(_ended(run), stale_buttons=(cancel_button(run.run_id, disabled=True),))
        try:
            await asyncio.to_thread(self._api.cancel, run.run_id)
        except ApiError as exc:
            if exc.code != "CONFLICT":
                raise
            # It ended between the look and the cancel: say how it ended, not how it looked.
            ended = await asyncio.to_thread(self._api.run, run.run_id)
            return Reply(_ended(ended), stale_buttons=(cancel_button(run.run_id, disabled=True),))
        return Reply(f"Cancellation requested for run `{run.run_id}`; it stops within a few seconds.")

    async def _evaluate(self, run: RunInfo, request_key: str) -> Reply:
        accepted = await asyncio.to_thread(self._api.evaluate, run.run_id, "test", request_key)
        return Reply(
            f"Evaluating run `{accepted.run_id}` on its test split (job `{accepted.job_id}`); "
            "the result comes as a direct message."
        )

    async def _retry(self, run: RunInfo, request_key: str) -> Reply:
        accepted = await asyncio.to_thread(self._api.retry, run.run_id, request_key)
        # Same request, same test split: its completed DM offers the same buttons.
        test_split = (await self._live.state(run.run_id)).test_split
        queued = queued_again(accepted.run_id, run.run_id)
        await self._live.open(run.user_id, accepted.run_id, queued, test_split=test_split)
        return Reply(
            f"Training again: run `{accepted.run_id}` (job `{accepted.job_id}`), "
            "with its own live message in your direct messages."
        )


def custom_id_of(interaction: nextcord.Interaction[nextcord.Client]) -> str:
    """The pressed component's custom_id; "" for an interaction that has none."""
    custom_id = interaction.data.get("custom_id") if interaction.data else None
    return custom_id if isinstance(custom_id, str) else ""


def _ended(run: RunInfo) -> str:
    return f"Run `{run.run_id}` has already ended ({run.status}); there is nothing to cancel."
