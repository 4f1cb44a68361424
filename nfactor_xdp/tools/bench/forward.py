"""`nfactorctl bench forward`: the pass-through rate (no NF) per runtime
count, offered as fast as one CPU can generate, next to the XDP-only
ceiling measured the same way in the same run."""
from __future__ import annotations

from .harness import Bench, runtimes_label
from .load import GEN_CPU


def run_forward_bench(counts: list[int], duration: float = 5.0, flows: int = 64, size: int = 64,
                      name: str = "bench", batch: int = 64) -> dict:
    with Bench(name, flows, size, batch) as b:
        result = b.report("forward", {"flows": flows, "frame_bytes": size, "generator_cpu": GEN_CPU,
                                      "duration_s": duration, "mode": "UDP, XDP live frames, as fast as one CPU can",
                                      "runtime_batch": batch},
                          measurements=[])
        ceiling = None
        for label, n, bypass in [("xdp-ceiling (bypass)", 1, True)] + \
                [(runtimes_label(n), n, False) for n in counts]:
            b.node_up(n, bypass)
            m = b.trial(0, duration, tcp=False)
            m.update(b.status(), label=label, runtimes=0 if bypass else n)
            ceiling = ceiling or m["forwarded_mpps"]
            m["ratio_to_ceiling"] = m["forwarded_mpps"] / ceiling
            result["measurements"].append(m)
        return result
