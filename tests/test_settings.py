"""Settings.from_env: each variable is read, and anything unset or empty falls back to the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_store.settings import DEFAULT_REDIS_URL, Settings

FULL_ENV: dict[str, str] = {
    "REDIS_URL": "redis://cache.internal:6380/3",
    "SECURITY__API_KEY": "s3cret",
    "SECURITY__METRICS_TOKEN": "scraper-t0ken",
    "SECURITY__LINK_SECRET": "l1nk-secret",
    "APP__CORPUS_ROOT": "/data/corpora",
    "APP__ARTIFACTS_ROOT": "/data/artifacts",
    "APP__RUNS_ROOT": "s3://trainer-runs/prod",
    "APP__CACHE_ROOT": "/scratch/cache",
    "APP__CACHE_MAX_BYTES": "1073741824",
    "APP__STORE_TIMEOUT_S": "3",
    "APP__MAX_EPOCHS": "7",
    "APP__MAX_SEQ_LEN": "256",
    "APP__MAX_BATCH_SIZE": "32",
    "APP__MAX_BODY_BYTES": "4096",
    "APP__PROGRESS_INTERVAL_S": "0.5",
    "APP__HEARTBEAT_INTERVAL_S": "1.5",
    "APP__LEASE_S": "30",
    "APP__EVENTS_STREAM_MAXLEN": "500",
    "APP__MAX_ACTIVE_RUNS_PER_USER": "5",
    "APP__MAX_QUEUED_RUNS": "40",
    "APP__MAX_RUN_S": "3600.5",
    "APP__CHECKPOINT_INTERVAL_S": "45",
    "APP__LOG_STREAM_MAXLEN": "50",
    "APP__MAINTENANCE_INTERVAL_S": "5",
}


def test_defaults_when_environment_is_empty() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_url == DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"
    assert settings.api_key is None
    # Local folders by default: one machine needs no setting.
    assert settings.corpus_root == "var/corpora"
    assert settings.artifacts_root == "var/artifacts"
    assert settings.runs_root == "var/runs"
    assert settings.cache_root == Path("var/cache")
    assert settings.cache_max_bytes == 5 * 1024**3
    assert settings.store_timeout_s == 10.0
    assert settings.max_epochs == 100
    assert settings.max_seq_len == 1024
    assert settings.max_batch_size == 512
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.progress_interval_s == 2.0
    assert settings.heartbeat_interval_s == 5.0
    assert settings.lease_s == 60.0
    assert settings.events_stream_maxlen == 100_000
    assert settings.max_active_runs_per_user == 3
    assert settings.max_queued_runs == 1000
    assert settings.max_run_s == 24 * 3600
    assert settings.checkpoint_interval_s == 300.0
    assert settings.log_stream_maxlen == 10_000
    assert settings.maintenance_interval_s == 60.0


def test_every_variable_is_read() -> None:
    assert Settings.from_env(FULL_ENV) == Settings(
        redis_url="redis://cache.internal:6380/3",
        api_key="s3cret",
        metrics_token="scraper-t0ken",
        link_secret="l1nk-secret",
        corpus_root="/data/corpora",
        artifacts_root="/data/artifacts",
        runs_root="s3://trainer-runs/prod",
        cache_root=Path("/scratch/cache"),
        cache_max_bytes=1024**3,
        store_timeout_s=3.0,
        max_epochs=7,
        max_seq_len=256,
        max_batch_size=32,
        max_body_bytes=4096,
        progress_interval_s=0.5,
        heartbeat_interval_s=1.5,
        lease_s=30.0,
        events_stream_maxlen=500,
        max_active_runs_per_user=5,
        max_queued_runs=40,
        max_run_s=3600.5,
        checkpoint_interval_s=45.0,
        log_stream_maxlen=50,
        maintenance_interval_s=5.0,
    )


@pytest.mark.parametrize("name", sorted(FULL_ENV))
def test_each_variable_alone_changes_only_its_setting(name: str) -> None:
    settings = Settings.from_env({name: FULL_ENV[name]})
    full = Settings.from_env(FULL_ENV)
    defaults = Settings()
    changed = [
        field
        for field in Settings.__dataclass_fields__
        if getattr(settings, field) != getattr(defaults, field)
    ]
    assert len(changed) == 1
    assert getattr(settings, changed[0]) == getattr(full, changed[0])


@pytest.mark.parametrize("name", sorted(FULL_ENV))
def test_empty_values_fall_back_to_defaults(name: str) -> None:
    assert Settings.from_env({name: ""}) == Settings()


def test_reads_os_environ_when_no_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FULL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-environ:1/2")
    monkeypatch.setenv("APP__MAX_EPOCHS", "9")
    settings = Settings.from_env()
    assert settings.redis_url == "redis://from-environ:1/2"
    assert settings.max_epochs == 9
    assert settings.api_key is None


def test_a_malformed_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="many"):
        Settings.from_env({"APP__MAX_EPOCHS": "many"})
