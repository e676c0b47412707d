"""Process memory readings for benchmarks and evaluations (Linux /proc, glibc)."""

from __future__ import annotations

import contextlib
import ctypes
import os


def rss_mb() -> float:
    """Resident set size in MiB, after handing free heap pages back to the OS.

    glibc keeps freed memory in its arenas, so plain RSS also counts the high-water mark of
    short-lived buffers (a step's logits, attention scores); `malloc_trim` first makes RSS
    follow the memory actually held, which is what "flat memory" is about.
    """
    with contextlib.suppress(OSError):  # not glibc: plain RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
