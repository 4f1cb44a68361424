"""`nfactorctl bench chains`: the zero-loss rate per service chain (each NF
alone, then the three together) per runtime count, found by a binary search
over the offered rate (paper Fig. 6a), next to the XDP-only ceiling."""
from __future__ import annotations

from .harness import Bench, runtimes_label
from .load import GEN_CPU

CHAINS = [[], ["flow_monitor"], ["firewall"], ["http_parser"], ["flow_monitor", "firewall", "http_parser"]]


def run_chain_bench(counts: list[int], trial: float = 1.0, steps: int = 7, flows: int = 64,
                    name: str = "bench") -> dict:
    with Bench(name, flows) as b:
        result = b.report("chains", {
            "flows": flows, "generator_cpu": GEN_CPU,
            "mode": "TCP, every frame a full HTTP request with the flow's next sequence number",
            "frame_bytes": len(b.frame(True)),
            "zero_loss": "binary search over the offered rate, no frame lost in a trial"}, measurements=[])
        ceiling = b.ceiling(trial, tcp=True, steps=steps)
        ceiling.update(chain=[])
        result["measurements"].append(ceiling)
        for n in counts:
            b.node_up(n)
            for chain in CHAINS:
                b.set_chain(chain)
                m = b.zero_loss(tcp=True, seconds=trial, steps=steps)
                m.update(b.status(), label=f"{runtimes_label(n)}: {'->'.join(chain) or 'no NF'}",
                         runtimes=n, chain=chain,
                         ratio_to_ceiling=m["zero_loss_mpps"] / ceiling["zero_loss_mpps"])
                result["measurements"].append(m)
        return result
