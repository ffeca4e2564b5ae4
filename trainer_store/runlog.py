"""Each run's log lines in Redis: a capped stream per run, filled by a background writer, read by the API."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time

import redis

from trainer_store import streams
from trainer_store.runs import FINISHED_RUN_TTL_S, run_log_key
from trainer_store.streams import StreamEntry

log = logging.getLogger(__name__)

# Lines waiting for Redis; past this many the newest are dropped (and counted), never waited for.
BUFFER_LINES = 2000
BATCH_LINES = 200
FIELD = "line"


class RunLogWriter:
    """Sends a run's log lines to its stream from a thread of its own, so a slow or absent Redis costs
    the training nothing: `write` never blocks, and lines that cannot be stored are counted instead."""

    _STOP = object()

    def __init__(
        self, client: redis.Redis, run_id: str, maxlen: int, buffer_lines: int = BUFFER_LINES
    ) -> None:
        self._redis = client
        self._key = run_log_key(run_id)
        self._maxlen = maxlen
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer_lines)
        self._lock = threading.Lock()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"run-log-{run_id}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self._count_dropped(1)

    def close(self, timeout_s: float = 5.0) -> int:
        """Send what is buffered (for at most `timeout_s`), stop, and answer how many lines were dropped."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(self._STOP, timeout=timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        stuck = self._thread.is_alive()
        if stuck:
            self._count_dropped(self._queue.qsize())
        dropped = self.dropped
        if dropped:
            log.warning(
                "%d log lines did not reach Redis (%s); the run's logs.jsonl has them all", dropped, self._key
            )
            note = {
                "ts": time.time(),
                "level": "WARNING",
                "logger": __name__,
                "message": f"{dropped} log lines were not stored here while Redis was slow or away; "
                "the logs.jsonl of the run's artifacts has them all",
            }
            if not stuck:  # a Redis that holds the writer up would hold this note up too
                self._send([json.dumps(note)])
        return dropped

    def _count_dropped(self, lines: int) -> None:
        with self._lock:
            self._dropped += lines

    def _run(self) -> None:
        while True:
            batch: list[str] = []
            item = self._queue.get()
            while item is not self._STOP and isinstance(item, str):
                batch.append(item)
                if len(batch) >= BATCH_LINES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch and not self._send(batch):
                self._count_dropped(len(batch))
            if item is self._STOP:
                return

    def _send(self, lines: list[str]) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(self._key, {FIELD: line}, maxlen=self._maxlen, approximate=True)
        pipe.expire(self._key, FINISHED_RUN_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError:
            return False
        return True


def tail(client: redis.Redis, run_id: str, count: int) -> list[StreamEntry]:
    """The newest `count` lines, oldest first."""
    return list(reversed(streams.entries(client.xrevrange(run_log_key(run_id), count=count), FIELD)))


def read_after(client: redis.Redis, run_id: str, after_id: str, block_s: float | None) -> list[StreamEntry]:
    """Lines after `after_id`; waits up to `block_s` in Redis for the first (None: answers at once)."""
    return streams.read_after(client, run_log_key(run_id), FIELD, after_id, block_s)
