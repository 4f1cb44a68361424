"""Bounded histograms a runtime keeps for the metrics endpoint: fixed bucket
bounds, one count per bucket and a sum, never the samples themselves.  Shown
in the runtime's status (`Histogram.to_dict`), which the node's collector
(control/metrics.py) turns into Prometheus histograms."""
from __future__ import annotations

import bisect

# Bucket upper bounds (inclusive, as Prometheus' `le`); a last bucket takes the rest.
MIGRATION_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
SNAPSHOT_BYTES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RECOVERY_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: over every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_dict(self) -> dict:
        """le: the bounds; counts: per bucket, not cumulative, one more than
        the bounds (the last is over every bound)."""
        return {"le": list(self.bounds), "counts": list(self.counts), "count": sum(self.counts),
                "sum": round(self.sum, 6)}
