"""Process memory readings for benchmarks and evaluations (Linux /proc)."""

from __future__ import annotations

import os


def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
