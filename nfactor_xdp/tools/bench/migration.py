"""`nfactorctl bench migration`: flow migration under live traffic (paper
Fig. 7-8).  Each trial has a fresh 2-runtime node with the paper's chain
(flow_monitor -> firewall -> http_parser) and HTTP flows of its own (every
frame a request at the flow's next sequence number, so that a frame lost,
repeated or reordered by a migration puts the parser out of sync); once
every flow of the trial has its actor, every flow of runtime 0 is migrated
to runtime 1 while the traffic goes on.  Measured per flow count and
per-flow rate, and per cap on concurrent migrations."""
from __future__ import annotations

import time

from ...control import node_client as nodectl
from ...formats.config import NodeConfig
from ...kern import netns
from ...kern.maps import NodeMaps
from .accounting import account, switch_agent_stats
from .harness import POLL, BackgroundLoad, Bench, ratios, rt_status

PAPER_CHAIN = ["flow_monitor", "firewall", "http_parser"]
MIGRATION_PAPER = {"flow_latency_us": 636, "what": "the average flow migration completion time, 100 flows (not "
                   "overloaded), 2 runtimes, every flow through flow_monitor -> firewall -> http_parser, "
                   "at most 1000 concurrent migrations"}
MIGRATION_MAX_OFFERED = 150_000  # frames/s at most, whatever 2 runtimes carry without loss (measured in the run)


def _udp_counters(ns: str) -> dict:
    """UDP counters of the node's namespace (control messages travel its loopback)."""
    try:
        with netns.entered(ns), open("/proc/thread-self/net/snmp") as f:
            rows = [ln.split() for ln in f if ln.startswith("Udp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}
    except (OSError, IndexError, ValueError):
        return {}


def _placement(name: str, ids=(0, 1)) -> dict:
    """After a migration: does the switch send each flow to the runtime holding its actor?"""
    with NodeMaps(name) as maps:
        placed = {f["key"]: f["runtime"] for f in maps.flows()}
    where: dict[str, list[int]] = {}
    for i in ids:
        for a in nodectl.runtime_flows(name, i, detail=False, timeout=10.0) or []:
            where.setdefault(a["key"], []).append(i)
    return {"switch_flows": len(placed),
            "switch_not_at_actor": sum(1 for k, rt in placed.items() if k in where and rt not in where[k]),
            "actor_on_both_runtimes": sum(1 for v in where.values() if len(v) > 1),
            "switch_entry_without_actor": sum(1 for k in placed if k not in where)}


def _migration_trial(b: Bench, flows: int, rate: float, budget: float, cap: int, tail: float = 0.5,
                     fill_timeout: float = 10.0, src: int = 0, dst: int = 1) -> dict:
    """Traffic on `flows` new flows at `rate` frames/s each; once every flow has
    its actor, migrate all flows of runtime `src` to runtime `dst` while the
    traffic goes on.  The generator runs for the fill time + `budget` + `tail`
    seconds (it cannot be stopped early)."""
    fl = b.new_flows(flows, tcp=True)
    fill = 1.0 / rate  # one turn of the source-port rotation: every flow has sent once
    seconds = round(fill + 0.3 + budget + tail, 2)
    snaps = b.begin(fl)
    t0 = time.monotonic()
    load = BackgroundLoad(b.gen, b.frame(fl), rate=flows * rate, seconds=seconds, base=fl.base, flows=flows,
                          tcp=True)
    out = {"flows": flows, "rate_per_flow_pps": rate, "requested_pps": flows * rate, "generator_seconds": seconds}
    report = {}
    try:
        deadline = t0 + fill + fill_timeout
        while True:
            actors = [rt_status(b.name, i).get("flows") or 0 for i in (src, dst)]
            if sum(actors) >= flows or time.monotonic() > deadline or not load.running():
                break
            time.sleep(POLL)
        with NodeMaps(b.name) as maps:
            out["switch_flows"] = sum(1 for _ in maps["flows"].keys())
        t_ready = time.monotonic()
        out.update(fill_seconds=round(t_ready - t0, 3), actors_before=actors, on_source=actors[0])
        if sum(actors) < flows:
            raise RuntimeError(f"only {sum(actors)} of {flows} flows reached the runtimes in {t_ready - t0:.1f}s")
        sa0, udp0 = switch_agent_stats(b.name), _udp_counters(b.namespaces["node"])
        snaps.append(b.snap())
        try:
            report = nodectl.migrate(b.name, src, dst, timeout=10.0 + 2 * budget)
        except nodectl.NodeCtlError as e:
            # not finished in time: keep what the source runtime says (a fresh node: its first batch)
            out["error"] = str(e)[:300]
            report = nodectl.runtime_query(b.name, src, "migrate_status", batch=1) or {}
        t_done = time.monotonic()
        snaps.append(b.snap())
        sa1, udp1 = switch_agent_stats(b.name), _udp_counters(b.namespaces["node"])
    finally:
        load.join(seconds + 30)
    trial = b.end(snaps, fl, load.outcome(), flows * rate)
    window = t_done - t_ready
    # the counted drops while the batch ran (frames held or queued then are not lost: left out)
    in_window = {k: v for k, v in account(snaps[1:3], 0, 0)["drops"].items()
                 if k not in ("runtime_held_not_sent", "runtime_still_in_rx_ring")}
    sa = {k: sa1.get(k, 0) - sa0.get(k, 0) for k in ("moves", "batches", "membarriers", "membarrier_us_total",
                                                     "markers_sent", "marker_errors", "grace_errors")}
    grace_us = sa["membarrier_us_total"] / sa["membarriers"] if sa["membarriers"] else 0.0
    sts = [rt_status(b.name, i) for i in (src, dst)]
    mig = {k: sum((st.get("migration") or {}).get(k, 0) for st in sts)
           for k in ("marker_resends", "late_markers", "buffer_overflow", "replayed", "replay_tx_fail",
                     "after_marker", "in_refused", "markers_consumed", "taken_back")}
    out.update({
        "migrated": report.get("succeeded"), "failed": report.get("failed"), "retried": report.get("retried"),
        "total": report.get("total"), "in_progress": report.get("in_progress"),
        "batch_seconds": report.get("seconds"), "batch_us_per_flow": report.get("batch_us_per_flow"),
        "flow_latency_us": report.get("flow_latency_us") or {},
        "queued_behind_cap": max(0, (report.get("total") or 0) - cap),
        "last_error": report.get("last_error") or None,
        "traffic_throughout": window + (t_ready - t0) < trial["seconds"],  # the generator outlasted the batch
        "window": {"seconds": round(window, 4), "drops": in_window, "lost": sum(in_window.values()),
                   "sink_pps": round((snaps[2]["sink"] - snaps[1]["sink"]) / window, 1) if window > 0 else None},
        "switch_agent": {**sa, "grace_us_avg": round(grace_us, 1), "grace_us_max": sa1.get("membarrier_us_max"),
                         "moves_per_grace": round(sa["moves"] / sa["membarriers"], 1) if sa["membarriers"] else None,
                         "grace_share_of_batch": round(sa["membarrier_us_total"] / 1e6 / report["seconds"], 3)
                         if report.get("seconds") else None},
        "runtime_migration": mig,
        "node_udp": {k: udp1.get(k, 0) - udp0.get(k, 0) for k in ("InDatagrams", "RcvbufErrors", "InErrors")},
        "actors_after": [st.get("flows") for st in sts],
        "placement_after": _placement(b.name, (src, dst)),
        "trial": trial,
    })
    return out


def run_migration_bench(flow_counts=(100, 1000, 10000), rates=(10, 50, 100), caps=(100, 500, 1000, 2000),
                        cap_flows: int = 2000, cap_rate: float = 10.0, max_offered_pps: float | None = None,
                        tail: float = 0.5, ceiling_seconds: float = 2.0, chain: list[str] | None = None,
                        name: str = "bench", progress=None) -> dict:
    """Flow migration under live traffic (paper Fig. 7-8): every flow of runtime 0
    migrated to runtime 1, (1) per flow count and per-flow rate, (2) per cap on
    concurrent migrations.  Each trial has a fresh node, so runtime 0 holds about
    half of that trial's flows and nothing else."""
    chain = list(PAPER_CHAIN if chain is None else chain)
    t_start = time.monotonic()
    with Bench(name, progress=progress) as b:
        result = b.report("migration", {
            "mode": "TCP, every frame a full HTTP request at the flow's next sequence number, paced, "
                    "source port rotating over the trial's own flows",
            "frame_bytes": len(b.frame(b.new_flows(1, True))), "chain": chain, "runtimes": 2,
            "what": "a fresh node per trial; once every flow has its actor, nfactorctl migrate --from 0 --to 1 "
                    "--all while the traffic goes on",
            "figures": {"batch_seconds": "the whole batch, from the request to its last flow done (queueing "
                                         "behind the cap included)",
                        "batch_us_per_flow": "batch_seconds over the batch's flows",
                        "flow_latency_us": "each migrated flow's own migration, from its first message to its "
                                           "completion (queueing excluded, failed flows not counted)",
                        "window": "the counted drops while the batch ran; the trial's accounting covers it all"},
            "tail_s": tail}, paper_reference=MIGRATION_PAPER)
        # context: the XDP-only ceilings and what two runtimes carry with the chain without loss (the
        # rate forwarded at full speed would be that of a parser put out of sync by the losses)
        ctx = b.ceilings(ceiling_seconds, tcp=True)
        b.node_with_chain(2, chain)
        b.measuring(f"2 runtimes: {'->'.join(chain) or 'no NF'}, zero-loss")
        carry = b.zero_loss(tcp=True, seconds=1.0, steps=6)
        carry.update(label=b.measuring_now, runtimes=2,
                     **ratios(carry["zero_loss_mpps"], ctx, "forwarded_mpps"))
        measured = carry["zero_loss_mpps"] * 1e6
        limit = max_offered_pps if max_offered_pps is not None else min(MIGRATION_MAX_OFFERED, measured)
        result["context"] = [ctx["bypass"], ctx["lookup"], carry]
        result["offered_limit_pps"] = {"limit": round(limit), "zero_loss_2_runtimes_pps": round(measured),
                                       "nominal": MIGRATION_MAX_OFFERED, "given": max_offered_pps}

        def budget(n):  # seconds of traffic left for the migration itself (generous: ~2 ms per migrating flow)
            return 1.0 + n / 2 * 0.002

        def one(label, n, rate, cap=None):
            cap = cap if cap is not None else NodeConfig.max_migrations
            m = {"label": label, "flows": n, "rate_per_flow_pps": rate, "requested_pps": n * rate,
                 "max_migrations": cap, "chain": chain}
            if n * rate > limit:
                m.update(skipped=True, reason=f"offered {n * rate:.0f} frames/s exceeds what 2 runtimes carry "
                                              f"here without loss ({limit:.0f}/s)")
                return m
            try:
                b.measuring(label)
                b.node_with_chain(2, chain, max_migrations=cap, idle_timeout=NodeConfig.idle_timeout)
                m.update(_migration_trial(b, n, rate, budget(n), cap, tail=tail), skipped=False)
                # like the paper's figure: its chain, nothing queued behind the cap, not overloaded
                m["like_paper"] = (chain == PAPER_CHAIN and m["queued_behind_cap"] == 0 and m["failed"] == 0
                                   and m["trial"]["valid"] and m["trial"]["lost"] == 0)
            except (nodectl.NodeCtlError, RuntimeError) as e:
                m.update(skipped=False, error=str(e)[:300])
            return m

        result["fig7_flows_rates"] = [one(f"{n} flows x {r} pps", n, r) for n in flow_counts for r in rates]
        n2 = cap_flows
        if n2 * cap_rate > limit:
            n2 = int(limit // cap_rate)
        result["fig8_caps"] = {"flows": n2, "rate_per_flow_pps": cap_rate, "asked_flows": cap_flows,
                               "measurements": [one(f"{n2} flows, cap {c}", n2, cap_rate, cap=c) for c in caps]}
        result["run"] = {"flow_counts": list(flow_counts), "rates": list(rates), "caps": list(caps),
                         "seconds": round(time.monotonic() - t_start, 1)}
        return result
