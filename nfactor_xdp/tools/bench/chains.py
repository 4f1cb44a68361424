"""`nfactorctl bench chains`: the zero-loss rate per service chain (each NF
alone, then the three together) per runtime count, found by a binary search
over the offered rate and confirmed by a second trial (paper Fig. 6a), next to
the XDP-only ceilings of the same run.  Every trial has flows of its own: a
lossy trial desynchronises http_parser's flows, and must not leave later
trials a parser that has nothing left to do."""
from __future__ import annotations

from .harness import Bench, ratios, runtimes_label

CHAINS = [[], ["flow_monitor"], ["firewall"], ["http_parser"], ["flow_monitor", "firewall", "http_parser"]]


def run_chain_bench(counts: list[int], trial: float = 1.0, steps: int = 7, flows: int = 64,
                    name: str = "bench", progress=None) -> dict:
    with Bench(name, flows, progress=progress) as b:
        result = b.report("chains", {
            "flows": flows, "frame_bytes": len(b.frame(b.new_flows(1, True))),
            "mode": "TCP, every frame a full HTTP request with the flow's next sequence number, "
                    "new flows (source ports) for every trial",
            "zero_loss": "binary search over the requested rate; a trial passes if it offered frames, lost none, "
                         "every frame is accounted for and the NFs' counts match; the best rate is confirmed "
                         "by a second trial (10% lower each time it is not); rates are measured offered rates"},
            measurements=[])
        ceilings = b.ceilings(trial, tcp=True, steps=steps)
        result["ceilings"] = ceilings
        for n in counts:
            b.node_up(n)
            for chain in CHAINS:
                b.set_chain(chain)
                b.measuring(f"{runtimes_label(n)}: {'->'.join(chain) or 'no NF'}")
                m = b.zero_loss(tcp=True, seconds=trial, steps=steps)
                m.update(label=b.measuring_now, runtimes=n, chain=chain,
                         placement=b.placement, **ratios(m["zero_loss_mpps"], ceilings, "zero_loss_mpps"))
                result["measurements"].append(m)
        return result
