"""trainer_store.runlog: a run's log lines in a capped Redis stream, written without ever waiting."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scripts import devstack
from trainer_store import runlog, streams
from trainer_store.runlog import RunLogWriter
from trainer_store.runs import FINISHED_RUN_TTL_S, run_log_key


def line(n: int) -> str:
    return json.dumps({"ts": 1.0 + n, "level": "INFO", "logger": "test", "message": f"line {n}"})


def messages(entries: list[streams.StreamEntry]) -> list[str]:
    return [json.loads(entry.data)["message"] for entry in entries]


def test_lines_reach_the_runs_stream_and_read_back_in_order(redis_client: redis.Redis) -> None:
    writer = RunLogWriter(redis_client, "run-1", maxlen=1000)
    for n in range(5):
        writer.write(line(n))
    assert writer.close() == 0
    assert messages(runlog.tail(redis_client, "run-1", 3)) == ["line 2", "line 3", "line 4"]
    everything = runlog.read_after(redis_client, "run-1", streams.START_ID, None)
    assert messages(everything) == [f"line {n}" for n in range(5)]
    assert runlog.read_after(redis_client, "run-1", everything[1].entry_id, None) == everything[2:]
    # Kept as long as a finished run's record, counted from the last line.
    assert 0 < redis_client.ttl(run_log_key("run-1")) <= FINISHED_RUN_TTL_S
    assert runlog.tail(redis_client, "another-run", 10) == []


def test_the_stream_keeps_about_the_newest_maxlen_lines(redis_client: redis.Redis) -> None:
    writer = RunLogWriter(redis_client, "run-1", maxlen=10)
    for n in range(1000):
        writer.write(line(n))
    assert writer.close() == 0
    # Trimming is approximate (whole internal nodes of about a hundred entries).
    assert 10 <= redis_client.xlen(run_log_key("run-1")) < 300
    assert messages(runlog.tail(redis_client, "run-1", 2)) == ["line 998", "line 999"]


def test_a_blocking_read_wakes_for_the_next_line(redis_client: redis.Redis) -> None:
    assert runlog.read_after(redis_client, "run-1", streams.START_ID, 0.05) == []
    redis_client.xadd(run_log_key("run-1"), {"line": line(7)})
    redis_client.xadd(run_log_key("run-1"), {"other": "not a line"})
    assert messages(runlog.read_after(redis_client, "run-1", streams.START_ID, 5.0)) == ["line 7"]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[devstack.Service, redis.Redis]]:
    """A Redis of the test's own, to stop and start; its client fails at once rather than retrying."""
    service, url = devstack.start_redis(tmp_path)
    client = redis.Redis.from_url(url, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    yield service, client
    if service.process.poll() is None:
        os.kill(service.process.pid, signal.SIGCONT)
        service.stop()


def test_a_stalled_redis_never_holds_a_write_up_and_every_line_is_stored_or_counted(
    private_redis: tuple[devstack.Service, redis.Redis],
) -> None:
    service, client = private_redis
    writer = RunLogWriter(client, "run-1", maxlen=10_000, buffer_lines=50)
    os.kill(service.process.pid, signal.SIGSTOP)  # Redis is there but answers nothing
    began = time.monotonic()
    for n in range(1000):
        writer.write(line(n))
    # A write that waited for Redis would take its socket timeout (a second); these take microseconds.
    assert time.monotonic() - began < 0.5
    time.sleep(1.5)  # the batch in flight times out
    os.kill(service.process.pid, signal.SIGCONT)
    dropped = writer.close()
    entries = runlog.tail(client, "run-1", 10_000)
    stored, note = messages(entries[:-1]), messages(entries[-1:])
    assert dropped > 0
    assert len(stored) + dropped == 1000
    assert stored == sorted(stored, key=lambda message: int(message.split()[1]))
    assert note == [
        f"{dropped} log lines were not stored here while Redis was slow or away; "
        "the logs.jsonl of the run's artifacts has them all"
    ]


def test_a_redis_that_is_gone_costs_every_line_and_the_writer_still_closes(
    private_redis: tuple[devstack.Service, redis.Redis],
) -> None:
    service, client = private_redis
    service.stop()
    writer = RunLogWriter(client, "run-1", maxlen=100)
    for n in range(10):
        writer.write(line(n))
    began = time.monotonic()
    assert writer.close() == 10
    assert time.monotonic() - began < 5


def test_close_gives_up_on_a_redis_that_holds_the_writer(
    private_redis: tuple[devstack.Service, redis.Redis],
) -> None:
    service, client = private_redis
    writer = RunLogWriter(client, "run-1", maxlen=100, buffer_lines=5)
    os.kill(service.process.pid, signal.SIGSTOP)
    for n in range(3):
        writer.write(line(n))
    time.sleep(0.2)  # the first line is in flight, held by the stalled Redis
    for n in range(3, 6):
        writer.write(line(n))
    began = time.monotonic()
    dropped = writer.close(timeout_s=0.3)
    assert time.monotonic() - began < 0.9
    # What was still queued is counted; the note waits for no Redis that holds the writer up.
    assert dropped >= 3
    os.kill(service.process.pid, signal.SIGCONT)
    time.sleep(0.2)
    assert not any("were not stored" in message for message in messages(runlog.tail(client, "run-1", 100)))


def test_answers_not_shaped_like_our_entries_are_skipped() -> None:
    good = ("1-0", {b"line": b'{"message": "kept"}'})
    junk = ["junk", ("2-0",), ("3-0", "not fields"), ("4-0", {b"other": b"x"}), good]
    assert streams.entries(junk, "line") == [streams.StreamEntry("1-0", '{"message": "kept"}')]
    assert streams.entries(None, "line") == []
