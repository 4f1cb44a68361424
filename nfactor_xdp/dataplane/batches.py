"""A migration batch: the flows one `nfactorctl migrate` request (or a
drain, or the load balancer) asked to move, and how each fared."""
from __future__ import annotations

import collections
import time

NOT_MIGRATABLE_LISTED = 100  # keys of flows too big to move named in a batch's report


class Batch:
    """One `nfactorctl migrate` request: how its flows fared."""

    def __init__(self, bid: int, target: int, keys: list[bytes]):
        self.id, self.target = bid, target
        self.total = len(keys)
        self.waiting = collections.deque(keys)  # not started yet (concurrency cap), in order
        self.succeeded = self.failed = self.retried = 0
        self.not_migratable: list[bytes] = []  # failed: their state cannot fit a control message
        self.durations: list[float] = []
        self.started = time.monotonic()
        self.finished: float | None = None

    def report(self) -> dict:
        """seconds: the whole batch, from the request to its last flow done
        (queueing behind the concurrency cap included); batch_us_per_flow:
        that time over the batch's flows; flow_latency_us: each migrated
        flow's own migration, from its first message to its completion
        (queueing excluded, failed flows not counted)."""
        done = self.succeeded + self.failed
        seconds = (self.finished or time.monotonic()) - self.started
        lat = sorted(self.durations)
        latency = {}
        if lat:
            latency = {"avg": round(sum(lat) / len(lat) * 1e6, 1), "p50": round(lat[len(lat) // 2] * 1e6, 1),
                       "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, 1),
                       "max": round(lat[-1] * 1e6, 1), "flows": len(lat)}
        return {"batch": self.id, "to": self.target, "total": self.total, "succeeded": self.succeeded,
                "failed": self.failed, "retried": self.retried, "in_progress": self.total - done,
                "not_migratable": len(self.not_migratable),
                "not_migratable_flows": [k.hex() for k in self.not_migratable[:NOT_MIGRATABLE_LISTED]],
                "done": done == self.total, "seconds": round(seconds, 6),
                "batch_us_per_flow": round(seconds * 1e6 / self.total, 1) if self.total else None,
                "flow_latency_us": latency}
