"""`nfactorctl bench forward`: the pass-through rate (no NF) per runtime
count, offered as fast as one CPU can generate, next to the XDP-only
ceilings measured the same way in the same run."""
from __future__ import annotations

from .harness import Bench, ratios, runtimes_label


def run_forward_bench(counts: list[int], duration: float = 5.0, flows: int = 64, size: int = 64,
                      name: str = "bench", batch: int = 64, progress=None) -> dict:
    with Bench(name, flows, size, batch, progress=progress) as b:
        result = b.report("forward", {"flows": flows, "frame_bytes": len(b.frame(b.new_flows(1, False))),
                                      "duration_s": duration, "runtime_batch": batch,
                                      "mode": "UDP, XDP live frames, as fast as one CPU can, new flows per trial"},
                          measurements=[])
        ceilings = b.ceilings(duration, tcp=False)
        result["ceilings"] = ceilings
        for n in counts:
            b.node_up(n)
            b.set_chain([])
            b.measuring(runtimes_label(n))
            m = b.trial(0, duration, tcp=False)
            m.update(label=runtimes_label(n), runtimes=n, **ratios(m["forwarded_mpps"], ceilings, "forwarded_mpps"))
            result["measurements"].append(m)
        return result
