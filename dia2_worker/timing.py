"""Where start-up time goes: named phases with start and end on the system-wide monotonic clock.

Phases may overlap (weights load on one thread while the RunPod SDK imports on another), so each is kept
with its own interval, and the time to ready is simply when the last one ended. Times are seconds since
the process started (read from /proc), so the interpreter's own start-up is accounted for too.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator


def process_started_at() -> float:
    """The process's start on time.monotonic()'s clock (Linux: both count from boot); now elsewhere."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return time.monotonic()


class Phases:
    """Named intervals, recorded from any thread."""

    def __init__(self) -> None:
        self.started_at = process_started_at()
        self.records: list[dict] = [{"phase": "interpreter", "start": 0.0, "end": self.now(), "thread": "main"}]
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.started_at

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            with self._lock:
                self.records.append({"phase": name, "start": start, "end": self.now(),
                                     "thread": threading.current_thread().name})


PHASES = Phases()


def cpu_name() -> str:
    """The processor's model name, from /proc/cpuinfo (no subprocess, no extra package)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"
