"""trainer_tasks.resources on cgroup v2 and v1 files written under a temporary root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer_tasks import resources
from trainer_tasks.resources import MB, ResourceSample

PAGE = os.sysconf("SC_PAGE_SIZE")


def write(root: Path, name: str, value: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("150000 100000", 1.5), ("200000 50000", 4.0), ("50000", 0.5)],
)
def test_cpu_quota_from_cgroup_v2(cpu_max: str, expected: float | None, tmp_path: Path) -> None:
    write(tmp_path, "cpu.max", cpu_max)
    # v2 wins over any v1 files.
    write(tmp_path, "cpu/cpu.cfs_quota_us", "300000")
    write(tmp_path, "cpu/cpu.cfs_period_us", "100000")
    assert resources.cpu_quota(tmp_path) == expected


@pytest.mark.parametrize(
    ("quota_us", "period_us", "expected"),
    [("-1", "100000", None), ("0", "100000", None), ("250000", "100000", 2.5), ("50000", None, None)],
)
def test_cpu_quota_from_cgroup_v1(
    quota_us: str, period_us: str | None, expected: float | None, tmp_path: Path
) -> None:
    write(tmp_path, "cpu/cpu.cfs_quota_us", quota_us)
    if period_us is not None:
        write(tmp_path, "cpu/cpu.cfs_period_us", period_us)
    assert resources.cpu_quota(tmp_path) == expected


def test_no_cgroup_files_means_no_limits(tmp_path: Path) -> None:
    assert resources.cpu_quota(tmp_path) is None
    assert resources.memory_limit_bytes(tmp_path) is None
    assert resources.memory_usage_bytes(tmp_path) is None


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", 4),
        ("150000 100000", 1),
        ("50000 100000", 1),
        ("250000 100000", 2),
        ("800000 100000", 4),
    ],
)
def test_available_cpus_floors_the_quota_and_caps_it_at_the_affinity(
    cpu_max: str, expected: int, tmp_path: Path, four_cores: None
) -> None:
    write(tmp_path, "cpu.max", cpu_max)
    assert resources.available_cpus(tmp_path) == expected


def test_available_cpus_without_a_cgroup_is_the_affinity(tmp_path: Path, four_cores: None) -> None:
    assert resources.available_cpus(tmp_path) == 4


def test_available_cpus_on_this_machine() -> None:
    assert 1 <= resources.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "limit", "usage"),
    [
        ({"memory.max": "max", "memory.current": "1048576"}, None, MB),
        ({"memory.max": "536870912", "memory.current": "134217728"}, 512 * MB, 128 * MB),
        (
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/memory.usage_in_bytes": "2097152",
            },
            None,
            2 * MB,
        ),
        (
            {"memory/memory.limit_in_bytes": "1073741824", "memory/memory.usage_in_bytes": "268435456"},
            1024 * MB,
            256 * MB,
        ),
    ],
)
def test_memory_limit_and_usage_from_cgroup_v2_and_v1(
    files: dict[str, str], limit: int | None, usage: int, tmp_path: Path
) -> None:
    for name, value in files.items():
        write(tmp_path, name, value)
    assert resources.memory_limit_bytes(tmp_path) == limit
    assert resources.memory_usage_bytes(tmp_path) == usage


def test_memory_mb_is_the_cgroup_limit_else_physical_memory(tmp_path: Path) -> None:
    physical = resources.physical_memory_bytes()
    assert physical == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") > 0
    write(tmp_path, "memory.max", "max")
    assert resources.memory_mb(tmp_path) == physical // MB
    write(tmp_path, "memory.max", str(768 * MB + 5))
    assert resources.memory_mb(tmp_path) == 768
    v1 = tmp_path / "v1"
    write(v1, "memory/memory.limit_in_bytes", str(2**63 - 4096))
    assert resources.memory_mb(v1) == physical // MB


def test_rss_bytes_reads_resident_pages(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    statm.write_text("1000 25 10 1 0 30 0\n")
    assert resources.rss_bytes(statm) == 25 * PAGE
    assert resources.rss_bytes(tmp_path / "missing") == 0
    # This process has some memory resident.
    assert resources.rss_bytes() > MB


def test_sample_reports_rss_usage_limit_and_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "rss_bytes", lambda: 300 * MB + 5)
    write(tmp_path, "memory.max", str(2048 * MB))
    write(tmp_path, "memory.current", str(512 * MB + 7))
    assert resources.sample(tmp_path) == ResourceSample(
        main_rss_mb=300, cgroup_usage_mb=512, cgroup_limit_mb=2048, cgroup_pct=25.0
    )
    write(tmp_path, "memory.current", str(1000 * MB))
    # Rounded to one decimal: 1000 / 2048 is 48.828...%.
    assert resources.sample(tmp_path).cgroup_pct == 48.8


def test_sample_without_a_limit_has_no_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "rss_bytes", lambda: 10 * MB)
    write(tmp_path, "memory.max", "max")
    write(tmp_path, "memory.current", str(64 * MB))
    assert resources.sample(tmp_path) == ResourceSample(
        main_rss_mb=10, cgroup_usage_mb=64, cgroup_limit_mb=None, cgroup_pct=None
    )
    assert resources.sample(tmp_path / "none") == ResourceSample(
        main_rss_mb=10, cgroup_usage_mb=None, cgroup_limit_mb=None, cgroup_pct=None
    )


def test_sample_of_this_process() -> None:
    sampled = resources.sample()
    assert sampled.main_rss_mb > 0
    assert (sampled.cgroup_pct is None) == (sampled.cgroup_usage_mb is None or not sampled.cgroup_limit_mb)
