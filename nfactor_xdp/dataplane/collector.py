"""Python's cyclic garbage collector in a runtime: kept out of the packet path.

A runtime holds tens of thousands of long-lived objects (actors, their NF
states, the snapshots it keeps for its peers).  Left to itself, the
collector walks all of them in a full (generation 2) collection whenever
they grew by a quarter: measured here at 55-190 ms with 25,000 flows and
25,000 peers' snapshots, during which nothing reads the receive ring, and
each found nothing to free.  Almost every one of these objects is freed by
reference counting when its flow ends; cycles are rare.

So: what exists once the runtime is up and once it has recovered is frozen
(gc.freeze: the collector never walks it again), full collections come ten
times less often, and an explicit one runs in a quiet moment (no frame in
the last housekeeping interval) at most every FULL_EVERY seconds.  Each
collection's pause is measured (`status`: gc).
"""
from __future__ import annotations

import gc
import time

FULL_EVERY = 30.0   # seconds between full collections run in quiet moments
THRESHOLDS = (700, 10, 100)  # Python's defaults but the last (10): full collections ten times rarer


class Collector:
    def __init__(self):
        self.stats = {"collections": [0, 0, 0], "max_pause_ms": [0.0, 0.0, 0.0], "frozen": 0, "quiet_full": 0}
        self._started = 0.0
        self._last_full = time.monotonic()

    def start(self) -> None:
        gc.set_threshold(*THRESHOLDS)
        gc.callbacks.append(self._measure)
        self.freeze()

    def freeze(self) -> None:
        """What exists now lives as long as the runtime (or is freed by
        reference counting): the collector leaves it alone from now on."""
        gc.freeze()
        self.stats["frozen"] = gc.get_freeze_count()

    def quiet(self, now: float) -> None:
        """Housekeeping saw no frame: a full collection, if one is due."""
        if now - self._last_full >= FULL_EVERY:
            self._last_full = now
            gc.collect()
            self.stats["quiet_full"] += 1

    def _measure(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        g = info["generation"]
        ms = (time.perf_counter() - self._started) * 1e3
        self.stats["collections"][g] += 1
        if ms > self.stats["max_pause_ms"][g]:
            self.stats["max_pause_ms"][g] = round(ms, 2)

    def status(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.stats.items()}
