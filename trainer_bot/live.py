"""A run's live message: one DM per run, created when the run is queued and edited as it goes."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import redis.asyncio as aioredis

from trainer_bot.embeds import DirectMessage
from trainer_bot.sinks import DmSink, MessageGone, SentMessage
from trainer_store.metrics import Counter, count

# The live message of a run is edited as long as its run record lives (30 days).
RUN_STATE_TTL_S = 30 * 24 * 3600


def run_state_key(run_id: str) -> str:
    """The run's live message (channel_id, message_id), started_ts and test_split, kept across restarts."""
    return f"trainer:bot:runs:{run_id}"


@dataclass(frozen=True)
class RunState:
    message: SentMessage | None = None
    started_ts: float | None = None
    # Whether the run kept a test split, so its completed DM offers "Evaluate on test split".
    test_split: bool = False


class LiveMessages:
    """Writes each run's one live message; the command that queues a run and the events that follow it
    take turns through a lock per run, so a fast start can never make a second message."""

    def __init__(self, client: aioredis.Redis, sink: DmSink) -> None:
        self._redis = client
        self._sink = sink
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def state(self, run_id: str) -> RunState:
        found = await self._redis.hgetall(run_state_key(run_id))
        channel_id, message_id = _int_field(found, "channel_id"), _int_field(found, "message_id")
        message = None if channel_id is None or message_id is None else SentMessage(channel_id, message_id)
        return RunState(
            message=message,
            started_ts=_float_field(found, "started_ts"),
            test_split=_int_field(found, "test_split") == 1,
        )

    async def open(self, user_id: int, run_id: str, message: DirectMessage, test_split: bool) -> None:
        """The queued run's message, unless its events were quicker and made it already."""
        async with self._locks[run_id]:
            await self.remember(run_id, {"test_split": int(test_split)})
            if (await self.state(run_id)).message is None:
                await self._send(user_id, run_id, message)

    async def write(self, user_id: int, run_id: str, message: DirectMessage, create: bool = True) -> None:
        """Edit the run's message; send it first if it does not exist yet (or the user deleted it),
        unless `create` is False: a last word is not worth a message of its own."""
        async with self._locks[run_id]:
            sent = (await self.state(run_id)).message
            try:
                if sent is None:
                    raise MessageGone("no live message yet")
                await self._sink.edit(sent, message)
            except MessageGone:
                if create:
                    await self._send(user_id, run_id, message)

    def forget_lock(self, run_id: str) -> None:
        """The run has ended: no more writes compete for its message."""
        self._locks.pop(run_id, None)

    async def _send(self, user_id: int, run_id: str, message: DirectMessage) -> None:
        sent = await self._sink.send(user_id, message)
        await self.remember(
            run_id, {"channel_id": sent.channel_id, "message_id": sent.message_id}, counted="bot_dms_sent"
        )

    async def remember(
        self, run_id: str, fields: dict[str, float | int], counted: Counter | None = None
    ) -> None:
        key = run_state_key(run_id)
        pipe = self._redis.pipeline(transaction=False)
        for name, value in fields.items():
            pipe.hset(key, name, value)
        pipe.expire(key, RUN_STATE_TTL_S)
        if counted is not None:
            count(pipe, counted)
        await pipe.execute()


def _float_field(state: object, name: str) -> float | None:
    value = state.get(name) if isinstance(state, dict) else None
    return float(value) if isinstance(value, str) else None


def _int_field(state: object, name: str) -> int | None:
    value = state.get(name) if isinstance(state, dict) else None
    return int(value) if isinstance(value, str) else None
