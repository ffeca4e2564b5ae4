"""Latency from the worker's publish (EventBus) to the bot's DM handler, beside a bare pub/sub loop."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from schemas.events import EVENTS_CHANNEL, TrainStarted
from scripts import devstack
from trainer_bot.app import connect_redis
from trainer_bot.embeds import Button, DirectMessage
from trainer_bot.notifier import Notifier, NotifierSettings
from trainer_bot.sinks import SentMessage
from trainer_tasks.events import EventBus


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, latencies_s: list[float]) -> Figures:
        ordered = sorted(latencies_s)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000)


def paced(count: int, rate: float, send: Callable[[int], None]) -> None:
    """Calls send(i) at `rate` per second on a fixed schedule, so a slow send does not slow the rate."""
    start = time.perf_counter()
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(index)


def bare_listener(
    url: str, sent_at: dict[str, float], count: int, latencies: list[float]
) -> threading.Thread:
    """redis-py alone: a blocking pub/sub listener on `trainer:events`, the bus's low-latency channel."""
    pubsub = redis.Redis.from_url(url).pubsub()
    pubsub.subscribe(EVENTS_CHANNEL)
    assert pubsub.get_message(timeout=5)  # the subscribe confirmation

    def listen() -> None:
        while len(latencies) < count:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                received = time.perf_counter()
                run_id = json.loads(message["data"])["run_id"]
                latencies.append(received - sent_at[run_id])
        pubsub.close()

    return threading.Thread(target=listen)


class _TimingSink:
    """The bot's DM handler end: notes when each event's DM would go out."""

    def __init__(self, sent_at: dict[str, float], count: int, done: asyncio.Event) -> None:
        self._sent_at = sent_at
        self.latencies: list[float] = []
        self._count, self._done = count, done

    async def send(self, user_id: int, message: DirectMessage) -> SentMessage:
        run_id = str(message.embed.description).split("`")[1]
        self.latencies.append(time.perf_counter() - self._sent_at[run_id])
        if len(self.latencies) == self._count:
            self._done.set()
        return SentMessage(user_id, len(self.latencies))

    async def edit(self, sent: SentMessage, message: DirectMessage) -> None:
        raise AssertionError("the benchmark sends started events only")

    async def set_buttons(self, sent: SentMessage, buttons: tuple[Button, ...]) -> None:
        raise AssertionError("the benchmark sends started events only")


def measure(url: str, count: int, rate: float) -> tuple[list[float], list[float]]:
    """One EventBus.send per event (PUBLISH and XADD in one pipeline, as the worker's callback does),
    received at once by a bare pub/sub listener and by the bot's notifier over the durable stream, so
    both see the same events under the same load."""
    redis.Redis.from_url(url).flushdb()
    sent_at: dict[str, float] = {}
    ready = threading.Event()
    bare: list[float] = []
    bot: list[float] = []

    async def consume() -> None:
        done = asyncio.Event()
        sink = _TimingSink(sent_at, count, done)

        async def no_curve(run_id: str) -> bytes | None:
            return None

        notifier = Notifier(connect_redis(url), sink, no_curve, NotifierSettings(recover_interval_s=3600))
        await notifier.step()  # creates the group
        ready.set()
        task = asyncio.create_task(notifier.run(done))
        await done.wait()
        await task
        bot.extend(sink.latencies)

    consumer = threading.Thread(target=asyncio.run, args=(consume(),))
    consumer.start()
    listener = bare_listener(url, sent_at, count, bare)
    listener.start()
    ready.wait(10)
    bus = EventBus(redis.Redis.from_url(url), stream_maxlen=100_000)

    def publish(index: int) -> None:
        run_id = uuid.uuid4().hex
        event = TrainStarted(
            request_id=run_id,
            run_id=run_id,
            user_id=123456789012345678,
            event_id=uuid.uuid4().hex,
            seq=1,
            ts=time.time(),
            model_family="gpt2",
            model_size="tiny",
            total_epochs=1,
            queue="training",
        )
        sent_at[run_id] = time.perf_counter()
        bus.send(event)

    paced(count, rate, publish)
    consumer.join()
    listener.join()
    return bare, bot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1000, help="events per rate (default 1000)")
    parser.add_argument(
        "--rates",
        default="200,1",
        help="events per second, comma-separated; 'RATE:EVENTS' overrides --events",
    )
    parser.add_argument("--redis-url", help="an existing Redis; default: a private one started here")
    args = parser.parse_args(argv)
    service = None
    url = args.redis_url
    if url is None:
        service, url = devstack.start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    try:
        print(
            f"{'rate/s':>7} {'events':>7} {'loop':<5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'target':>8}"
        )
        for spec in args.rates.split(","):
            rate_text, _, events_text = spec.partition(":")
            rate, count = float(rate_text), int(events_text or args.events)
            bare_latencies, bot_latencies = measure(url, count, rate)
            bare, bot = Figures.of(bare_latencies), Figures.of(bot_latencies)
            for name, figures in (("bare", bare), ("bot", bot)):
                target = ""
                if name == "bot":
                    met = figures.p50_ms <= 1.5 * bare.p50_ms + 1 and figures.p99_ms <= 1.5 * bare.p99_ms + 1
                    target = "met" if met else "MISSED"
                print(
                    f"{rate:>7g} {count:>7} {name:<5} {figures.p50_ms:>8.2f} {figures.p99_ms:>8.2f} "
                    f"{figures.max_ms:>8.2f} {target:>8}",
                    flush=True,
                )
    finally:
        if service is not None:
            service.stop()


if __name__ == "__main__":  # pragma: no cover - a command-line program
    main()
