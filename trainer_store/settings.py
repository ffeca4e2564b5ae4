"""Configuration read from the environment, shared by every process (nested names use `__`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
GIB = 1024**3


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    api_key: str | None = None
    # A bearer token that opens `/metrics` alone, for a scraper that should not hold the API key.
    metrics_token: str | None = None
    # Signs download links that work without the API key until they expire (POST /runs/{id}/links).
    link_secret: str | None = None
    # Each root is a local folder or an object-store URL, `s3://bucket/prefix` (trainer_store.storage).
    corpus_root: str = "var/corpora"
    artifacts_root: str = "var/artifacts"
    runs_root: str = "var/runs"
    # A worker's local folder: what it downloaded (least recently used evicted first) and its scratch space.
    cache_root: Path = Path("var/cache")
    cache_max_bytes: int = 5 * GIB
    # How long one request to the store may take to connect, and to answer each read.
    store_timeout_s: float = 10.0
    max_epochs: int = 100
    max_seq_len: int = 1024
    max_batch_size: int = 512
    max_body_bytes: int = 1024 * 1024
    max_corpus_bytes: int = 50 * 1024 * 1024
    progress_interval_s: float = 2.0
    heartbeat_interval_s: float = 5.0
    lease_s: float = 60.0
    events_stream_maxlen: int = 100_000
    # Discord users (user_id > 0) may have this many runs queued or running at once.
    max_active_runs_per_user: int = 3
    max_queued_runs: int = 1000
    # Wall-clock seconds a run may spend training, summed over its attempts.
    max_run_s: float = 24 * 3600.0
    # A running run also saves `last.ckpt` this often (besides each epoch's end), so a worker that dies
    # mid-epoch loses at most this much training.
    checkpoint_interval_s: float = 300.0
    # Log lines kept per run in its Redis stream.
    log_stream_maxlen: int = 10_000
    # How often a worker's main process runs the periodic checks (one worker at a time).
    maintenance_interval_s: float = 60.0
    # A followed stream (a run's logs or events) sends a comment after this long without an entry: a
    # client that went away is noticed, and its server thread freed, at the next write.
    stream_keepalive_s: float = 15.0
    # A worker's registry entry lives this long unless its main process renews it (every third of it).
    worker_ttl_s: float = 30.0
    # Admit runs for queues that no live worker consumes (they wait until one starts).
    allow_offline_queues: bool = False
    # The Procfile's stream line as clients reach it (e.g. https://stream.example.com): the web line's
    # single-threaded workers redirect followed streams and downloads there. None: served where asked.
    stream_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(name) or default

        def number(name: str, default: int) -> int:
            return int(env[name]) if env.get(name) else default

        def seconds(name: str, default: float) -> float:
            return float(env[name]) if env.get(name) else default

        return cls(
            redis_url=text("REDIS_URL", DEFAULT_REDIS_URL),
            api_key=env.get("SECURITY__API_KEY") or None,
            metrics_token=env.get("SECURITY__METRICS_TOKEN") or None,
            link_secret=env.get("SECURITY__LINK_SECRET") or None,
            corpus_root=text("APP__CORPUS_ROOT", defaults.corpus_root),
            artifacts_root=text("APP__ARTIFACTS_ROOT", defaults.artifacts_root),
            runs_root=text("APP__RUNS_ROOT", defaults.runs_root),
            cache_root=Path(env["APP__CACHE_ROOT"]) if env.get("APP__CACHE_ROOT") else defaults.cache_root,
            cache_max_bytes=number("APP__CACHE_MAX_BYTES", defaults.cache_max_bytes),
            store_timeout_s=seconds("APP__STORE_TIMEOUT_S", defaults.store_timeout_s),
            max_epochs=number("APP__MAX_EPOCHS", defaults.max_epochs),
            max_seq_len=number("APP__MAX_SEQ_LEN", defaults.max_seq_len),
            max_batch_size=number("APP__MAX_BATCH_SIZE", defaults.max_batch_size),
            max_body_bytes=number("APP__MAX_BODY_BYTES", defaults.max_body_bytes),
            max_corpus_bytes=number("APP__MAX_CORPUS_BYTES", defaults.max_corpus_bytes),
            progress_interval_s=seconds("APP__PROGRESS_INTERVAL_S", defaults.progress_interval_s),
            heartbeat_interval_s=seconds("APP__HEARTBEAT_INTERVAL_S", defaults.heartbeat_interval_s),
            lease_s=seconds("APP__LEASE_S", defaults.lease_s),
            events_stream_maxlen=number("APP__EVENTS_STREAM_MAXLEN", defaults.events_stream_maxlen),
            max_active_runs_per_user=number(
                "APP__MAX_ACTIVE_RUNS_PER_USER", defaults.max_active_runs_per_user
            ),
            max_queued_runs=number("APP__MAX_QUEUED_RUNS", defaults.max_queued_runs),
            max_run_s=seconds("APP__MAX_RUN_S", defaults.max_run_s),
            checkpoint_interval_s=seconds("APP__CHECKPOINT_INTERVAL_S", defaults.checkpoint_interval_s),
            log_stream_maxlen=number("APP__LOG_STREAM_MAXLEN", defaults.log_stream_maxlen),
            maintenance_interval_s=seconds("APP__MAINTENANCE_INTERVAL_S", defaults.maintenance_interval_s),
            stream_keepalive_s=seconds("APP__STREAM_KEEPALIVE_S", defaults.stream_keepalive_s),
            worker_ttl_s=seconds("APP__WORKER_TTL_S", defaults.worker_ttl_s),
            allow_offline_queues=env.get("APP__ALLOW_OFFLINE_QUEUES", "").lower() in ("1", "true", "yes"),
            stream_url=(env.get("APP__STREAM_URL") or "").rstrip("/") or None,
        )
