"""The statuses a run or a short job (tokenizer training, evaluation) reports on the wire."""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["queued", "running", "completed", "failed", "canceled"]
RUN_STATUSES: tuple[RunStatus, ...] = ("queued", "running", "completed", "failed", "canceled")
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "canceled"})
ACTIVE_STATUSES: tuple[RunStatus, ...] = ("queued", "running")

JobStatus = Literal["queued", "running", "completed", "failed"]
JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "completed", "failed")
