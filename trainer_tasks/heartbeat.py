"""A background thread that renews a run's lease, writes its heartbeat and notices cancel requests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

import redis

from trainer_store.runs import RunStore

log = logging.getLogger(__name__)


class Heartbeat:
    """Runs beside training, so a long validation or checkpoint never stalls the heartbeat."""

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        holder: str,
        *,
        interval_s: float,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._holder = holder
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._clock = clock
        self._stop = threading.Event()
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def beat(self) -> None:
        try:
            if not self._store.renew(self._run_id, self._holder, self._lease_s, self._clock()):
                self.lease_lost.set()
                log.warning("run %s: lease lost; another executor may take the run over", self._run_id)
            if self._store.cancel_requested(self._run_id):
                self.cancel_requested.set()
        except redis.RedisError as exc:
            # Training goes on; the lease outlives a few missed beats.
            log.warning("run %s: heartbeat failed: %s", self._run_id, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
