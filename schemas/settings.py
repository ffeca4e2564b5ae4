"""Configuration read from the environment, shared by every process (nested names use `__`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    api_key: str | None = None
    corpus_root: Path = Path("var/corpora")
    artifacts_root: Path = Path("var/artifacts")
    runs_root: Path = Path("var/runs")
    logs_root: Path = Path("var/logs")
    max_epochs: int = 100
    max_seq_len: int = 1024
    max_batch_size: int = 512
    max_body_bytes: int = 1024 * 1024
    max_corpus_bytes: int = 50 * 1024 * 1024
    progress_interval_s: float = 2.0
    heartbeat_interval_s: float = 5.0
    lease_s: float = 60.0
    events_stream_maxlen: int = 100_000

    def run_dir(self, run_id: str) -> Path:
        """A run's working folder: checkpoints and data splits (never served)."""
        return self.runs_root / run_id

    def model_dir(self, run_id: str) -> Path:
        """A run's artifact folder, the only one the API serves files from."""
        return self.artifacts_root / "models" / run_id

    def run_log(self, run_id: str) -> Path:
        """What the worker logged for a run, one JSON object a line (served by GET /runs/{id}/logs)."""
        return self.logs_root / f"{run_id}.jsonl"

    def tokenizer_dir(self, tokenizer_id: str) -> Path:
        return self.artifacts_root / "tokenizers" / tokenizer_id

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()

        def path(name: str, default: Path) -> Path:
            return Path(env[name]) if env.get(name) else default

        def number(name: str, default: int) -> int:
            return int(env[name]) if env.get(name) else default

        def seconds(name: str, default: float) -> float:
            return float(env[name]) if env.get(name) else default

        return cls(
            redis_url=env.get("REDIS_URL") or DEFAULT_REDIS_URL,
            api_key=env.get("SECURITY__API_KEY") or None,
            corpus_root=path("APP__CORPUS_ROOT", defaults.corpus_root),
            artifacts_root=path("APP__ARTIFACTS_ROOT", defaults.artifacts_root),
            runs_root=path("APP__RUNS_ROOT", defaults.runs_root),
            logs_root=path("APP__LOGS_ROOT", defaults.logs_root),
            max_epochs=number("APP__MAX_EPOCHS", defaults.max_epochs),
            max_seq_len=number("APP__MAX_SEQ_LEN", defaults.max_seq_len),
            max_batch_size=number("APP__MAX_BATCH_SIZE", defaults.max_batch_size),
            max_body_bytes=number("APP__MAX_BODY_BYTES", defaults.max_body_bytes),
            max_corpus_bytes=number("APP__MAX_CORPUS_BYTES", defaults.max_corpus_bytes),
            progress_interval_s=seconds("APP__PROGRESS_INTERVAL_S", defaults.progress_interval_s),
            heartbeat_interval_s=seconds("APP__HEARTBEAT_INTERVAL_S", defaults.heartbeat_interval_s),
            lease_s=seconds("APP__LEASE_S", defaults.lease_s),
            events_stream_maxlen=number("APP__EVENTS_STREAM_MAXLEN", defaults.events_stream_maxlen),
        )
