"""Turns the durable event stream into direct messages: a consumer group, at least once, no duplicates."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from schemas.events import (
    EVENTS_STREAM,
    EvalCompleted,
    EvalFailed,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    decode_event,
)
from trainer_bot import embeds
from trainer_bot.embeds import DirectMessage, Download
from trainer_bot.live import LiveMessages
from trainer_bot.sinks import DmRefused, DmSink
from trainer_store.metrics import Counter, count

log = logging.getLogger(__name__)

GROUP = "trainer-bot"
PARKED_STREAM = "trainer:bot:parked"
ATTEMPTS_KEY = "trainer:bot:attempts"
# A DM recorded as sent is remembered longer than any entry can stay pending or be re-read.
SENT_TTL_S = 7 * 24 * 3600
ATTEMPTS_TTL_S = 7 * 24 * 3600
PARKED_MAXLEN = 10_000
# Only transport trouble is retried with backoff; a Redis answer that is an error is a bug to surface.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

LossCurve = Callable[[str], Awaitable[bytes | None]]
DownloadLink = Callable[[str], Awaitable[Download | None]]


async def no_download(run_id: str) -> Download | None:
    return None


def sent_key(dedup_id: str) -> str:
    return f"trainer:bot:sent:{dedup_id}"


@dataclass(frozen=True)
class StreamEntry:
    entry_id: str
    payload: str | None


@dataclass(frozen=True)
class NotifierSettings:
    consumer: str = "bot-1"
    edit_interval_s: float = 3.0
    max_attempts: int = 5
    recover_interval_s: float = 15.0
    claim_idle_s: float = 60.0
    batch: int = 100
    block_ms: int = 1000
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass
class _Deferred:
    entry_id: str
    event: TrainProgress


class Notifier:
    """Reads `trainer:events:stream` as group `trainer-bot` and DMs each event's user through a sink."""

    def __init__(
        self,
        client: aioredis.Redis,
        sink: DmSink,
        loss_curve: LossCurve,
        settings: NotifierSettings | None = None,
        *,
        download: DownloadLink = no_download,
        live: LiveMessages | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._redis = client
        self._sink = sink
        self._loss_curve = loss_curve
        self._download = download
        # Shared with the commands, which create a queued run's live message.
        self._live = live or LiveMessages(client, sink)
        self._settings = settings or NotifierSettings()
        self._clock = clock
        self._sleep = sleep
        self._group_ready = False
        self._next_recovery = float("-inf")
        # Per run: when its progress message was last written, the newest progress entry seen,
        # and the progress entry that waits for the edit interval to pass.
        self._last_edit: dict[str, float] = {}
        self._newest_progress: dict[str, tuple[int, int]] = {}
        self._deferred: dict[str, _Deferred] = {}
        # What each run's live message shows now, so its last edit keeps it.
        self._shown: dict[str, DirectMessage] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Step until `stop` is set; a lost Redis connection is retried with exponential backoff."""
        delay = self._settings.backoff_initial_s
        while not stop.is_set():
            try:
                await self.step()
            except REDIS_DOWN as exc:
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self._settings.backoff_max_s)
            else:
                delay = self._settings.backoff_initial_s

    async def step(self) -> None:
        """One round: recover pending entries when due, read new ones, write progress whose time came."""
        if not self._group_ready:
            await self._ensure_group()
        if self._clock() >= self._next_recovery:
            await self.recover()
            self._next_recovery = self._clock() + self._settings.recover_interval_s
        await self.flush_due()
        reply = await self._redis.xreadgroup(
            GROUP,
            self._settings.consumer,
            {EVENTS_STREAM: ">"},
            count=self._settings.batch,
            block=self._block_ms(),
        )
        await self.handle(_read_reply(reply))
        await self.flush_due()

    async def _ensure_group(self) -> None:
        try:
            # "$": a first start does not DM the stream's whole history; from then on nothing is missed.
            await self._redis.xgroup_create(EVENTS_STREAM, GROUP, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _block_ms(self) -> int:
        waits = [self._edit_wait(run_id) for run_id in self._deferred]
        if not waits:
            return self._settings.block_ms
        # Wake up for the earliest deferred edit; 0 would mean "block forever" to Redis.
        return max(1, min(self._settings.block_ms, round(min(waits) * 1000)))

    async def recover(self) -> None:
        """Re-read this consumer's own pending entries, then claim those a dead consumer left behind."""
        last_id = "0"
        while True:
            reply = await self._redis.xreadgroup(
                GROUP, self._settings.consumer, {EVENTS_STREAM: last_id}, count=self._settings.batch
            )
            entries = _read_reply(reply)
            if not entries:
                break
            await self.handle(entries)
            last_id = entries[-1].entry_id
        start = "0-0"
        while True:
            claimed = await self._redis.xautoclaim(
                EVENTS_STREAM,
                GROUP,
                self._settings.consumer,
                min_idle_time=round(self._settings.claim_idle_s * 1000),
                start_id=start,
                count=self._settings.batch,
            )
            start = str(claimed[0])
            await self.handle(_stream_entries(claimed[1]))
            if start == "0-0":
                break

    async def handle(self, entries: list[StreamEntry]) -> None:
        """Handle a batch in order; of several progress events of one run only the newest is written."""
        decoded = [(entry, _decode(entry)) for entry in entries]
        newest: dict[str, str] = {}
        for entry, event in decoded:
            if isinstance(event, TrainProgress):
                newest[event.run_id] = entry.entry_id
        for entry, event in decoded:
            if isinstance(event, TrainProgress) and newest[event.run_id] != entry.entry_id:
                # Catch-up after downtime: a newer state of the same run follows in this batch.
                await self._ack(entry.entry_id)
                continue
            await self._attempt(entry, event)

    async def _attempt(self, entry: StreamEntry, event: TrainEvent | NotAnEvent) -> None:
        try:
            await self._dispatch(entry.entry_id, event)
        except DmRefused as exc:
            log.warning("event %s not delivered, and not retried: %s", entry.entry_id, exc)
            await self._ack(entry.entry_id, counted="bot_dms_refused")
        except Exception as exc:
            # It stays pending: the next recovery retries it, and parks it after too many tries.
            log.warning(
                "event %s failed (%s: %s); it will be retried", entry.entry_id, type(exc).__name__, exc
            )
            await self._count_failure(entry, exc)

    async def _dispatch(self, entry_id: str, event: TrainEvent | NotAnEvent) -> None:
        if isinstance(event, NotAnEvent):
            log.warning("skipping stream entry %s: %s", entry_id, event.reason)
            await self._ack(entry_id)
        elif event.user_id == 0:
            await self._ack(entry_id)
        elif isinstance(event, TrainProgress):
            await self._progress(entry_id, event)
        elif isinstance(event, TrainStarted):
            await self._started(entry_id, event)
        else:
            if isinstance(event, (TrainCompleted, TrainFailed)):
                await self._end_live(event)
            await self._once(entry_id, event)

    async def _started(self, entry_id: str, event: TrainStarted) -> None:
        """The live message says the run started (again, after a resume); edits, so never twice."""
        if event.ts is not None:
            await self._live.remember(event.run_id, {"started_ts": event.ts})
        await self._show(event.user_id, event.run_id, embeds.started(event))
        await self._ack(entry_id)

    async def _show(self, user_id: int, run_id: str, message: DirectMessage) -> None:
        self._last_edit[run_id] = self._clock()
        await self._live.write(user_id, run_id, message)
        self._shown[run_id] = message

    async def _once(
        self, entry_id: str, event: TrainCompleted | TrainFailed | EvalCompleted | EvalFailed
    ) -> None:
        """Send a DM unless one was recorded for this event; record it right after Discord accepts it."""
        dedup = sent_key(event.event_id or entry_id)
        already_sent = await self._redis.exists(dedup)
        if not already_sent:
            await self._sink.send(event.user_id, await self._render(event))
        # One round trip records the DM and the acknowledgement together.
        pipe = self._redis.pipeline(transaction=False)
        if not already_sent:
            pipe.set(dedup, entry_id, ex=SENT_TTL_S)
            count(pipe, "bot_dms_sent")
        _ack(pipe, entry_id)
        await pipe.execute()

    async def _render(
        self, event: TrainCompleted | TrainFailed | EvalCompleted | EvalFailed
    ) -> DirectMessage:
        if isinstance(event, TrainFailed):
            return embeds.failed(event)
        if isinstance(event, (EvalCompleted, EvalFailed)):
            return embeds.evaluated(event)
        state = await self._live.state(event.run_id)
        return embeds.completed(
            event,
            loss_curve=await self._loss_curve(event.run_id),
            download=await self._download(event.run_id),
            test_split=state.test_split,
        )

    async def _end_live(self, event: TrainCompleted | TrainFailed) -> None:
        """The run ended: its live message shows its last state, marked ended, with Cancel disabled."""
        run_id = event.run_id
        deferred = self._deferred.pop(run_id, None)
        last = self._shown.get(run_id)
        if deferred is not None:
            last = embeds.progress(deferred.event, (await self._live.state(run_id)).started_ts)
        await self._live.write(event.user_id, run_id, embeds.ended(event, last), create=False)
        if deferred is not None:
            await self._ack(deferred.entry_id)
        for per_run in (self._last_edit, self._newest_progress, self._shown):
            per_run.pop(run_id, None)
        self._live.forget_lock(run_id)

    async def _progress(self, entry_id: str, event: TrainProgress) -> None:
        order = _order(entry_id)
        newest = self._newest_progress.get(event.run_id)
        if newest is not None and order < newest:
            await self._ack(entry_id)  # re-read after a newer state of the run was seen
            return
        self._newest_progress[event.run_id] = order
        waiting = self._deferred.pop(event.run_id, None)
        if waiting is not None and waiting.entry_id != entry_id:
            await self._ack(waiting.entry_id)
        if self._edit_wait(event.run_id) > 0:
            self._deferred[event.run_id] = _Deferred(entry_id, event)
            return
        await self._write_progress(entry_id, event)

    def _edit_wait(self, run_id: str) -> float:
        last = self._last_edit.get(run_id)
        return 0.0 if last is None else last + self._settings.edit_interval_s - self._clock()

    async def flush_due(self) -> None:
        """Write the deferred progress of every run whose edit interval has passed."""
        for run_id, deferred in list(self._deferred.items()):
            if self._edit_wait(run_id) <= 0:
                del self._deferred[run_id]
                entry = StreamEntry(deferred.entry_id, None)
                await self._attempt(entry, deferred.event)

    async def _write_progress(self, entry_id: str, event: TrainProgress) -> None:
        started_ts = (await self._live.state(event.run_id)).started_ts
        await self._show(event.user_id, event.run_id, embeds.progress(event, started_ts))
        await self._ack(entry_id)

    async def _ack(self, entry_id: str, counted: Counter | None = None) -> None:
        pipe = self._redis.pipeline(transaction=False)
        _ack(pipe, entry_id)
        if counted is not None:
            count(pipe, counted)
        await pipe.execute()

    async def _count_failure(self, entry: StreamEntry, error: Exception) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(ATTEMPTS_KEY, entry.entry_id, 1)
        pipe.expire(ATTEMPTS_KEY, ATTEMPTS_TTL_S)
        failures, _ = await pipe.execute()
        if int(failures) >= self._settings.max_attempts:
            await self._park(entry.entry_id, f"{type(error).__name__}: {error}")

    async def _park(self, entry_id: str, reason: str) -> None:
        """Move an entry that keeps failing aside, so the entries behind it are not held up."""
        found = await self._redis.xrange(EVENTS_STREAM, entry_id, entry_id)
        payload = _stream_entries(found)[0].payload if found else None
        await self._redis.xadd(
            PARKED_STREAM,
            {"entry_id": entry_id, "event": payload or "", "reason": reason[:500]},
            maxlen=PARKED_MAXLEN,
            approximate=True,
        )
        log.error("event %s parked in %s after repeated failures: %s", entry_id, PARKED_STREAM, reason)
        await self._ack(entry_id, counted="bot_dms_parked")


def _ack(pipe: aioredis.client.Pipeline, entry_id: str) -> None:
    pipe.xack(EVENTS_STREAM, GROUP, entry_id)
    pipe.hdel(ATTEMPTS_KEY, entry_id)


def _decode(entry: StreamEntry) -> TrainEvent | NotAnEvent:
    if entry.payload is None:
        return NotAnEvent("no 'event' field (the entry was trimmed or written by someone else)")
    return decode_event(entry.payload)


def _read_reply(reply: object) -> list[StreamEntry]:
    """XREADGROUP's answer for our one stream: [[stream, [(id, fields), ...]]]."""
    entries: list[StreamEntry] = []
    for _stream, items in reply if isinstance(reply, list) else []:
        entries.extend(_stream_entries(items))
    return entries


def _stream_entries(items: object) -> list[StreamEntry]:
    entries: list[StreamEntry] = []
    for entry_id, fields in items if isinstance(items, list) else []:
        # Redis 6.2's XAUTOCLAIM answers (None, None) for an entry trimmed away; the next own-pending
        # read returns it with no fields, and it is acknowledged then.
        if isinstance(entry_id, str):
            payload = fields.get("event") if isinstance(fields, dict) else None
            entries.append(StreamEntry(entry_id, payload if isinstance(payload, str) else None))
    return entries


def _order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
