"""What the worker really has: CPUs and memory under its cgroup limits (v2 or v1), and its own RSS."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number near 2**63.
UNLIMITED_BYTES = 2**60
MB = 1024 * 1024


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or "100000")
    quota_us, period_us = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_us is None or period_us is None or int(quota_us) <= 0:
        return None
    return int(quota_us) / int(period_us)


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on, capped by the cgroup's CPU quota (rounded down, at least 1)."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def _bytes(value: str | None) -> int | None:
    if value is None or value == "max" or int(value) >= UNLIMITED_BYTES:
        return None
    return int(value)


def memory_limit_bytes(root: Path = CGROUP_ROOT) -> int | None:
    if (root / "memory.max").exists():
        return _bytes(_read(root / "memory.max"))
    return _bytes(_read(root / "memory" / "memory.limit_in_bytes"))


def memory_usage_bytes(root: Path = CGROUP_ROOT) -> int | None:
    if (root / "memory.current").exists():
        return _bytes(_read(root / "memory.current"))
    return _bytes(_read(root / "memory" / "memory.usage_in_bytes"))


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rss_bytes(statm: Path = Path("/proc/self/statm")) -> int:
    """Resident set size of this process now (not the peak that getrusage reports)."""
    resident_pages = int((_read(statm) or "0 0").split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ResourceSample:
    main_rss_mb: int
    cgroup_usage_mb: int | None
    cgroup_limit_mb: int | None
    cgroup_pct: float | None


def sample(root: Path = CGROUP_ROOT) -> ResourceSample:
    usage, limit = memory_usage_bytes(root), memory_limit_bytes(root)
    return ResourceSample(
        main_rss_mb=rss_bytes() // MB,
        cgroup_usage_mb=usage // MB if usage is not None else None,
        cgroup_limit_mb=limit // MB if limit is not None else None,
        cgroup_pct=round(100 * usage / limit, 1) if usage is not None and limit else None,
    )


def memory_mb(root: Path = CGROUP_ROOT) -> int:
    """Memory the worker may use: its cgroup limit, else the machine's."""
    limit = memory_limit_bytes(root)
    return (limit if limit is not None else physical_memory_bytes()) // MB
