"""sinkserve's custom Prometheus metrics on Triton's metrics port, from `engine.stats()`.

`pb_utils` is passed in (the Python backend's module, or a stand-in in tests), so this
module imports nothing from Triton.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sinkserve.engine.types import EngineStats

# name -> (help text, how to read it from the stats)
GAUGES: dict[str, tuple[str, Callable[[EngineStats], float]]] = {
    "sinkserve_sessions_active": ("Sessions open", lambda s: s.sessions),
    "sinkserve_sessions_in_slots": (
        "Sessions whose cache is in a device slot",
        lambda s: s.sessions_in_slots,
    ),
    "sinkserve_sessions_swapped": (
        "Idle sessions swapped to host memory",
        lambda s: s.sessions_swapped,
    ),
    "sinkserve_slots_free": ("Free KV slots", lambda s: s.slots_free),
    "sinkserve_turns_running": ("Turns generating or prefilling", lambda s: s.turns_running),
    "sinkserve_turns_waiting": ("Turns waiting for a slot", lambda s: s.turns_waiting),
    "sinkserve_store_up": (
        "1 while the last write to the session store succeeded, else 0",
        lambda s: s.store_healthy,
    ),
    "sinkserve_store_pending_records": (
        "Session records waiting to be written to the store",
        lambda s: s.store_pending,
    ),
}
COUNTERS: dict[str, tuple[str, Callable[[EngineStats], int]]] = {
    "sinkserve_prefill_tokens_total": ("Prompt tokens prefilled", lambda s: s.prefill_tokens),
    "sinkserve_generated_tokens_total": ("Tokens generated", lambda s: s.generated_tokens),
    "sinkserve_evicted_tokens_total": ("Tokens evicted from windows", lambda s: s.evicted_tokens),
    "sinkserve_steps_total": ("Engine steps", lambda s: s.steps),
    "sinkserve_store_write_errors_total": (
        "Failed writes to the session store (each retried)",
        lambda s: s.store_write_errors,
    ),
}


# Engine step durations, seconds: a CPU step of a small model is milliseconds to a second.
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class EngineMetrics:
    """Registers the families once per instance and refreshes them every `interval_s`."""

    def __init__(
        self,
        pb_utils: Any,
        labels: dict[str, str],
        stats: Callable[[], EngineStats],
        step_seconds: Callable[[], list[float]],
        interval_s: float = 1.0,
    ):
        family = pb_utils.MetricFamily
        steps = family(
            name="sinkserve_step_duration_seconds",
            description="Engine step duration (one batched forward + sampling)",
            kind=family.HISTOGRAM,
        )
        self._step_histogram = steps.Metric(labels=labels, buckets=STEP_BUCKETS)
        self._step_seconds = step_seconds
        self._families = [steps]
        self._gauges = {}
        self._counters = {}
        for name, (doc, _) in GAUGES.items():
            fam = family(name=name, description=doc, kind=family.GAUGE)
            self._families.append(fam)
            self._gauges[name] = fam.Metric(labels=labels)
        for name, (doc, _) in COUNTERS.items():
            fam = family(name=name, description=doc, kind=family.COUNTER)
            self._families.append(fam)
            self._counters[name] = fam.Metric(labels=labels)
        self._seen = dict.fromkeys(COUNTERS, 0)  # counter totals already reported
        self._stats = stats
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkserve-metrics", daemon=True)
        self._thread.start()

    def update(self, stats: EngineStats) -> None:
        for seconds in self._step_seconds():
            self._step_histogram.observe(seconds)
        for name, (_, get) in GAUGES.items():
            self._gauges[name].set(float(get(stats)))
        for name, (_, get) in COUNTERS.items():
            total = int(get(stats))
            if total > self._seen[name]:
                self._counters[name].increment(float(total - self._seen[name]))
                self._seen[name] = total

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.update(self._stats())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
