"""`nfactorctl bench chains`: the zero-loss rate per service chain (each NF
alone, then the three together) per runtime count, found by a binary search
over the offered rate and confirmed by a second trial (paper Fig. 6a), next to
the XDP-only ceilings of the same run; with offload off (every frame through
Python) and on (decided flows forwarded by the switch: docs/offload.md).
Every trial has flows of its own: a lossy trial desynchronises http_parser's
flows, and must not leave later trials a parser that has nothing left to do."""
from __future__ import annotations

from .harness import Bench, ratios, runtimes_label

CHAINS = [[], ["flow_monitor"], ["firewall"], ["http_parser"], ["flow_monitor", "firewall", "http_parser"]]
# with offload: the chains whose NFs hand a decided flow to the switch, a rate limit set above any
# offered rate (enforced in XDP, never reached), then chains that need every packet in Python
OFFLOAD_CHAINS = [[], ["flow_monitor"], ["firewall"], ["flow_monitor", "firewall"], ["rate_limiter"],
                  ["flow_monitor", "firewall", "http_parser"]]
# the full chain in observe mode (the rule asks for it): the switch forwards, http_parser reads copies;
# measured twice: the zero-loss rate of the traffic (copies the runtime cannot read are counted, never
# traffic), then the highest rate at which the parser also sees every copy
FULL_CHAIN = ["flow_monitor", "firewall", "http_parser"]
OBSERVE_RUNS = (("observe", False, None), ("observe, every copy parsed", True, 250_000))
# (Python parses tens of thousands of copies a second: searched from 0.25 Mpps down, not from the traffic's
# full speed, the steps land where the answer is)
NF_CONFIG = {"rate_limiter": {"pps": 1_000_000_000, "burst": 1_000_000}}


def run_chain_bench(counts: list[int], trial: float = 1.0, steps: int = 7, flows: int = 64,
                    name: str = "bench", progress=None, offload: tuple[str, ...] = ("off", "on"),
                    only: list[str] | None = None) -> dict:
    """only: measure just these chains ("flow_monitor,firewall", "none" for
    no NF, "observe" for the full chain in observe mode); the ceilings always."""
    def wanted(chain: list[str]) -> bool:
        return not only or (",".join(chain) or "none") in only
    with Bench(name, flows, progress=progress) as b:
        result = b.report("chains", {
            "flows": flows, "frame_bytes": len(b.frame(b.new_flows(1, True))),
            "mode": "TCP, every frame a full HTTP request with the flow's next sequence number, "
                    "new flows (source ports) for every trial",
            "zero_loss": "binary search over the requested rate; a trial passes if it offered frames, lost none, "
                         "every frame is accounted for and the NFs' counts match; the best rate is confirmed "
                         "by a second trial (10% lower each time it is not); rates are measured offered rates",
            "offload": "off: every frame through the runtimes. on: each trial first sends "
                       "a few frames per flow and waits until the flows are offloaded (chains without "
                       "http_parser, or with it in observe mode), then the load; those frames count in the trial",
            "observe": "the full chain with its rule in observe mode: the switch forwards every frame and copies it "
                       "to the runtime's observe ring for http_parser. 'observe': zero loss of traffic (copies the "
                       "runtime could not read are counted as observe_lost, never as loss); 'observe, every copy "
                       "parsed': a trial passes only if no copy was lost either"},
            measurements=[])
        ceilings = b.ceilings(trial, tcp=True, steps=steps)
        result["ceilings"] = ceilings
        for mode in offload:
            for n in counts:
                b.node_up(n, offload=mode)
                for chain in OFFLOAD_CHAINS if mode == "on" else CHAINS:
                    if not wanted(chain):
                        continue
                    b.set_chain(chain, nf_config=NF_CONFIG)
                    b.measuring(f"{runtimes_label(n)}, offload {mode}: {'->'.join(chain) or 'no NF'}")
                    m = b.zero_loss(tcp=True, seconds=trial, steps=steps)
                    m.update(label=b.measuring_now, runtimes=n, chain=chain, offload=mode,
                             placement=b.placement, **ratios(m["zero_loss_mpps"], ceilings, "zero_loss_mpps"),
                             **_python_share(m))
                    result["measurements"].append(m)
                if mode == "on" and (not only or "observe" in only):
                    for label, full, max_pps in OBSERVE_RUNS:
                        b.set_chain(FULL_CHAIN, nf_config=NF_CONFIG, observe=True)
                        b.full_observation = full
                        b.measuring(f"{runtimes_label(n)}, offload on: {'->'.join(FULL_CHAIN)} ({label})")
                        try:
                            m = b.zero_loss(tcp=True, seconds=trial, steps=steps, max_pps=max_pps)
                        finally:
                            b.full_observation = False
                        m.update(label=b.measuring_now, runtimes=n, chain=FULL_CHAIN, offload=mode, observe=label,
                                 placement=b.placement, **ratios(m["zero_loss_mpps"], ceilings, "zero_loss_mpps"),
                                 **_python_share(m), **_observation(m))
                        result["measurements"].append(m)
        return result


def _observation(m: dict) -> dict:
    """Of the confirming trials' copies (observe mode), how many were lost."""
    trials = [m["trials"][i] for i in m["confirming_trials"]] or m["trials"][:1]
    return {"observe_copies": sum(t.get("observe_copies", 0) for t in trials),
            "observe_lost": sum(t.get("observe_lost", 0) for t in trials)}


def _python_share(m: dict) -> dict:
    """Of the frames the confirming trials offered, the share that reached the
    runtimes (the rest the switch handled alone), and whether the flows were
    offloaded."""
    trials = [m["trials"][i] for i in m["confirming_trials"]] or m["trials"][:1]
    offered = sum(t["offered"] for t in trials) or 1
    checks = [t.get("nf_checks") or {} for t in trials]
    return {"python_share": sum(t["to_actors"] for t in trials) / offered,
            "offloaded_flows": min((c.get("offloaded_flows", 0) for c in checks), default=0),
            "not_offloaded_because": sorted({r for c in checks for r in c.get("not_offloaded_because", [])})}
