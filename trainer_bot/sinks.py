"""Where direct messages go: Discord through nextcord, or the console when the bot has no token."""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import nextcord

from trainer_bot.embeds import Button, DirectMessage, clip

log = logging.getLogger(__name__)

# Discord's JSON error code for "Cannot send messages to this user" (DMs closed or no shared server).
DMS_CLOSED = 50007


@dataclass(frozen=True)
class SentMessage:
    channel_id: int
    message_id: int


class DmRefused(Exception):
    """The user does not accept DMs from the bot: final, retrying would only count as an invalid request."""


class MessageGone(Exception):
    """The message to edit no longer exists (the user deleted it)."""


class DmSink(Protocol):
    async def send(self, user_id: int, message: DirectMessage) -> SentMessage: ...

    async def edit(self, sent: SentMessage, message: DirectMessage) -> None: ...

    async def set_buttons(self, sent: SentMessage, buttons: tuple[Button, ...]) -> None:
        """Change only the buttons of a message (disable those that no longer apply)."""


STYLES = {
    "primary": nextcord.ButtonStyle.primary,
    "secondary": nextcord.ButtonStyle.secondary,
    "danger": nextcord.ButtonStyle.danger,
}


def view_of(buttons: tuple[Button, ...]) -> nextcord.ui.View:
    """The buttons as components. Nothing is kept in memory per message: one handler dispatches every
    press by custom_id (trainer_bot.buttons), so presses work on messages sent before a restart."""
    view = nextcord.ui.View(timeout=None, prevent_update=False)
    for button in buttons:
        view.add_item(
            nextcord.ui.Button(
                style=STYLES[button.style],
                label=button.label,
                custom_id=button.custom_id,
                disabled=button.disabled,
            )
        )
    return view


class DiscordSink:
    """DMs through nextcord's HTTP client, which honours rate limits and retries 429 itself."""

    def __init__(self, client: nextcord.Client) -> None:
        self._client = client
        # Discord answers the same DM channel for a user every time; asking once per process is enough.
        self._channels: dict[int, int] = {}

    async def send(self, user_id: int, message: DirectMessage) -> SentMessage:
        message = clip(message)
        try:
            channel_id = await self._dm_channel(user_id)
            channel = self._client.get_partial_messageable(channel_id, type=nextcord.ChannelType.private)
            view = view_of(message.buttons)
            if message.attachment is None:
                sent = await channel.send(embed=message.embed, view=view)
            else:
                data = io.BytesIO(message.attachment.data)
                file = nextcord.File(data, filename=message.attachment.filename)
                sent = await channel.send(embed=message.embed, file=file, view=view)
        except nextcord.Forbidden as exc:
            if exc.code == DMS_CLOSED:
                raise DmRefused(f"user {user_id} does not accept direct messages") from exc
            raise
        return SentMessage(channel_id=channel_id, message_id=sent.id)

    async def _dm_channel(self, user_id: int) -> int:
        if user_id not in self._channels:
            payload = await self._client.http.start_private_message(user_id)
            self._channels[user_id] = int(payload["id"])
        return self._channels[user_id]

    async def edit(self, sent: SentMessage, message: DirectMessage) -> None:
        message = clip(message)
        await self._edit(sent, embed=message.embed, view=view_of(message.buttons))

    async def set_buttons(self, sent: SentMessage, buttons: tuple[Button, ...]) -> None:
        await self._edit(sent, view=view_of(buttons))

    async def _edit(self, sent: SentMessage, **changes: nextcord.Embed | nextcord.ui.View) -> None:
        channel = self._client.get_partial_messageable(sent.channel_id, type=nextcord.ChannelType.private)
        try:
            await channel.get_partial_message(sent.message_id).edit(**changes)
        except nextcord.NotFound as exc:
            raise MessageGone(f"message {sent.message_id} is gone") from exc


class ConsoleSink:
    """Prints each DM as text, so a demo without a Discord token shows what would be sent."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self._write = write
        self._ids = itertools.count(1)

    async def send(self, user_id: int, message: DirectMessage) -> SentMessage:
        sent = SentMessage(channel_id=user_id, message_id=next(self._ids))
        self._write(f"--- DM to user {user_id} (message {sent.message_id}) ---\n{as_text(message)}")
        return sent

    async def edit(self, sent: SentMessage, message: DirectMessage) -> None:
        self._write(
            f"--- DM to user {sent.channel_id} (message {sent.message_id}, edited) ---\n{as_text(message)}"
        )

    async def set_buttons(self, sent: SentMessage, buttons: tuple[Button, ...]) -> None:
        self._write(
            f"--- DM to user {sent.channel_id} (message {sent.message_id}, buttons) ---\n{_buttons(buttons)}"
        )


def as_text(message: DirectMessage) -> str:
    embed = message.embed
    lines = [f"# {embed.title}"]
    if embed.description:
        lines.append(embed.description)
    lines.extend(f"{field.name}: {field.value}" for field in embed.fields)
    if message.attachment is not None:
        lines.append(f"[attached {message.attachment.filename}, {len(message.attachment.data):,} bytes]")
    if message.buttons:
        lines.append(_buttons(message.buttons))
    return "\n".join(lines)


def _buttons(buttons: tuple[Button, ...]) -> str:
    return " ".join(f"[{b.label}{' (disabled)' if b.disabled else ''}]" for b in buttons) or "[no buttons]"
