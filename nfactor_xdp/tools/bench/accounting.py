"""Every frame of a trial accounted for, and the NFs' own view of it.

The path of a generator frame and where each loss is counted:

    generator  XDP_TX into its veth        its own tracepoints (not offered)
    switch     parse, placement, redirect  drop_* counters, redirect_err (tracer)
      -> runtime port ring (XDP xmit)      sw-rtN tx_dropped
    steer      into the AF_XDP socket      no_socket (rt_stats), the socket's rx_dropped + rx_ring_full
    runtime    the chain, migration, ...   its dropped.* counters, TX ring full,
                                           held and not sent yet, still in its RX ring
      -> its veth (copy-mode TX, skb)      rtN tx_dropped
    switch     return path, redirect       drop_rt_* counters, redirect_err
      -> sink host's ring (XDP xmit)       ext1 tx_dropped
    sink       counts the trial's flows

offered = sent - generator's veth drops = forwarded + every counted drop +
unaccounted; a trial whose unaccounted is not 0 is flagged.  Migration
markers, which the switch agent puts into a runtime's port, share its ring
with the offered frames: those dropped are taken out of the counted drops.  Each loss has
one counter here.  The tracer's xmit_drop sees the same events as the veth
counters (and cannot tell namespaces apart), and its socket_full the same as
the sockets' own statistics, which are exact; the tracer was seen to miss a
batch of 64 that a socket counted (likely: a tracepoint program is skipped
on a CPU busy in another BPF program or a map syscall).  Both are kept as
cross-checks.  redirect_err has no other witness."""
from __future__ import annotations

import itertools

from pyroute2 import IPRoute

from ...control import node_client as nodectl
from ...formats import fabric
from ...kern import netns
from ...kern.maps import NodeMaps
from . import cpu

_XSK_STATE = ("rx_pending", "tx_queued")  # ring levels: states, not counters


def link_stats(ns: str) -> dict:
    """ifname -> the drop counters of every link in namespace `ns`."""
    with netns.entered(ns), IPRoute() as ipr:
        return {link.get("IFLA_IFNAME"): {k: s[k] for k in ("tx_dropped", "rx_dropped")}
                for link in ipr.get_links() if (s := link.get("IFLA_STATS64"))}


def runtime_counts(st: dict) -> dict:
    """The counters of one runtime's status (see Runtime.packet_counts),
    flattened; {} if it did not answer."""
    if not st:
        return {}
    dropped = st.get("dropped")
    if not isinstance(dropped, dict):  # a runtime from before per-reason drops
        dropped = {"handler": dropped or 0}
    xsk = st.get("xsk") or {}
    out = {"pid": st.get("pid"), "frames": st.get("frames") or 0, "forwarded": st.get("forwarded") or 0,
           "sent_later": st.get("sent_later") or 0, "markers": st.get("markers") or 0,
           "held": sum((st.get("held") or {}).values()), "tx_ring_full": xsk.get("tx_dropped_ring_full") or 0,
           # the kernel's count of frames this socket could not take (the tracer's socket_full, per runtime)
           "socket_full": (xsk.get("rx_dropped") or 0) + (xsk.get("rx_ring_full") or 0)}
    out.update({f"dropped_{k}": v for k, v in dropped.items()})
    out.update({k: xsk.get(k) or 0 for k in _XSK_STATE})
    return out


def snapshot(name: str, rt_ids: list[int], sink, node_ns: str, pids: dict[str, int],
             workers: dict[int, str] | None = None, fabric_ns: str | None = None) -> dict:
    """One reading of every counter the accounting needs.  workers: the
    node's worker hosts (host -> namespace): their runtimes' socket counts
    are their host's switch's, their links named "hN:ifname"; the fabric's
    links "fab:ifname"."""
    workers = workers or {}
    with NodeMaps(name) as maps:
        switch = maps.counters()
        rt_switch = {i: v["switch"] for i, v in maps.runtime_table().items()}
    links = link_stats(node_ns)
    node_pids = cpu.node_pids(name)
    for h, ns in workers.items():
        worker = fabric.worker_name(name, h)
        with NodeMaps(worker) as maps:
            for i, v in maps.runtime_table().items():
                # its socket's drops: the worker's steer program counts them; what went into it is read
                # from the ingress's side (sent over the fabric: outlives the host)
                rt_switch.setdefault(i, {}).update(no_socket=v["switch"]["no_socket"], remote=1)
            switch[f"h{h}"] = maps.counters()
        links.update({f"h{h}:{k}": v for k, v in link_stats(ns).items()})
        node_pids.update({k: v for k, v in cpu.node_pids(worker).items() if k.startswith("rt")})
    if fabric_ns:
        links.update({f"fab:{k}": v for k, v in link_stats(fabric_ns).items()})
    rts = {i: runtime_counts(nodectl.runtime_query(name, i, "status", timeout=2.0) or {}) for i in rt_ids}
    trial, other = sink.counts()
    return {"sink": trial, "sink_other": other, "switch": switch, "rt_switch": rt_switch, "runtimes": rts,
            "links": links, "cpu": cpu.sample({**pids, **node_pids}),
            # migration markers the switch agent put into runtimes' ports (None: it did not say)
            "markers_sent": switch_agent_stats(name).get("markers_sent")}


def switch_agent_stats(name: str) -> dict:
    """The switch agent's STATUS counters (moves, batches, markers_sent, membarrier_us_*)."""
    from ...formats.messages import MsgType
    try:
        return dict(nodectl.control_call(name, "switch", MsgType.STATUS, {}, timeout=0.5).get("stats") or {})
    except nodectl.NodeCtlError as e:
        return {"error": str(e)}


def _markers(a: dict, b: dict, consumed: int) -> dict:
    """Marker frames in a trial: they reach the runtimes' sockets with the
    generator's frames and can be dropped with them (a full ring), so the
    drops counted include those not consumed (the switch agent sends a lost
    one again)."""
    if a.get("markers_sent") is None or b.get("markers_sent") is None:
        return {"injected": None, "consumed": consumed, "among_drops": 0}
    injected = b["markers_sent"] - a["markers_sent"]
    return {"injected": injected, "consumed": consumed, "among_drops": max(0, injected - consumed)}


def _delta(a: dict, b: dict) -> dict:
    return {k: v - a.get(k, 0) for k, v in b.items() if isinstance(v, int)}


def runtime_deltas(snaps: list[dict]) -> dict[int, dict]:
    """Per runtime, its counters' growth over the snapshots; a runtime whose
    process was replaced between two snapshots counts from the new process's
    start (what the old one did after the earlier snapshot is lost with it)."""
    out: dict[int, dict] = {}
    for a, b in itertools.pairwise(snaps):
        for rt, cb in b["runtimes"].items():
            ca = a["runtimes"].get(rt) or {}
            if not cb:
                continue
            d = _delta(ca if ca.get("pid") == cb["pid"] else {}, cb)
            for k in ("pid",) + _XSK_STATE:
                d.pop(k, None)
            acc = out.setdefault(rt, {})
            for k, v in d.items():
                acc[k] = acc.get(k, 0) + v
            if ca.get("pid") not in (None, cb["pid"]):
                acc["replaced"] = acc.get("replaced", 0) + 1
    return out


def _link_delta(a: dict, b: dict, names, key: str = "tx_dropped") -> int:
    total = 0
    for ifname in names:
        vb = b["links"].get(ifname, {}).get(key, 0)
        va = a["links"].get(ifname, {}).get(key, 0)
        total += vb - va if vb >= va else vb  # a recreated link counts from 0
    return total


def _ring_levels(a: dict, b: dict) -> dict[int, int]:
    """Frames waiting in each runtime's RX ring at the end, less at the start
    (a killed runtime's ring went with it: not counted here)."""
    return {rt: cb.get("rx_pending", 0) - (a["runtimes"].get(rt) or {}).get("rx_pending", 0)
            for rt, cb in b["runtimes"].items() if cb}


def _per_runtime(a: dict, b: dict, rts: dict, pending: dict) -> dict:
    """Per runtime: frames into its socket and back out (the switch's view,
    which outlives a runtime process), what its own counters explain of the
    difference, and what they do not (for a killed runtime: what died with it)."""
    out = {}
    for rt, st in b["rt_switch"].items():
        sa = a["rt_switch"].get(rt, {})
        into_key = "to_rt_packets" if st.get("remote") else "to_socket"  # a worker host's: sent to it
        into, back = st[into_key] - sa.get(into_key, 0), st["from_rt_packets"] - sa.get("from_rt_packets", 0)
        d = rts.get(rt, {})
        kept = (sum(v for k, v in d.items() if k.startswith("dropped_")) + d.get("markers", 0)
                + d.get("held", 0) - d.get("sent_later", 0) + d.get("tx_ring_full", 0) + d.get("socket_full", 0)
                + pending.get(rt, 0) + _link_delta(a, b, [f"rt{rt}"]))
        out[rt] = {"into_socket": into, "back_from_runtime": back, "explained": kept,
                   "not_explained": into - back - kept}
    return out


def account(snaps: list[dict], sent: int, failed: int) -> dict:
    """Where the frames of a trial went, from its snapshots (first: before
    the load, last: after it settled) and the generator's counts: `sent`
    frames, of which `failed` its veth did not take."""
    a, b = snaps[0], snaps[-1]
    sw = _delta(a["switch"], b["switch"])
    rts = runtime_deltas(snaps)

    def total(key: str) -> int:
        return sum(d.get(key, 0) for d in rts.values())

    pending = _ring_levels(a, b)
    node_links = b["links"]
    local = {n: n.rsplit(":", 1)[-1] for n in node_links}  # a worker host's links are "hN:ifname"
    rt_ports = [n for n, i in local.items() if i.startswith("sw-rt")]
    rt_ends = [n for n, i in local.items() if i.startswith("rt") and i[2:].isdigit()]
    # the fabric between hosts: each host's fab0 and the bridge's ports (both ways: tx and rx drops)
    fabric_links = [n for n, i in local.items() if i == "fab0" or n.startswith("fab:")]
    offered = sent - failed
    forwarded = b["sink"] - a["sink"]
    drops = {f"switch_{k}": v for k, v in sw.items() if k.startswith("drop_") and v}
    # offloaded flows: dropped by the switch for their actors (their NFs' verdicts and buckets)
    drops["switch_offload_drop"] = sw.get("off_drop", 0) + sw.get("off_bucket_drop", 0)
    drops["switch_redirect_err"] = sw.get("redirect_err", 0)
    drops["runtime_port_full"] = _link_delta(a, b, rt_ports)
    drops["runtime_no_socket"] = sum(st.get("no_socket", 0) - a["rt_switch"].get(rt, {}).get("no_socket", 0)
                                     for rt, st in b["rt_switch"].items())
    drops["runtime_socket_full"] = total("socket_full")
    reasons = sorted({k for d in rts.values() for k in d if k.startswith("dropped_")})
    drops.update({f"runtime_{k}": total(k) for k in reasons})
    drops["runtime_tx_ring_full"] = total("tx_ring_full")
    drops["runtime_held_not_sent"] = total("held") - total("sent_later")
    drops["runtime_still_in_rx_ring"] = sum(pending.values())
    drops["runtime_tx_veth_dropped"] = _link_delta(a, b, rt_ends)
    drops["sink_port_full"] = _link_delta(a, b, ["ext1"])
    drops["fabric_dropped"] = _link_delta(a, b, fabric_links) + _link_delta(a, b, fabric_links, "rx_dropped")
    for key, sub in b["switch"].items():  # the worker hosts' switches' drops
        if isinstance(sub, dict):
            for k, v in _delta(a["switch"].get(key, {}), sub).items():
                if k.startswith("drop_") and v:
                    drops[f"{key}_switch_{k}"] = v
    counted = sum(drops.values())
    markers = _markers(a, b, total("markers"))
    non_chain = sum(total(k) for k in reasons if k != "dropped_chain")
    return {
        "sent": sent, "generator_veth_dropped": failed, "offered": offered, "forwarded": forwarded,
        "lost": offered - forwarded, "drops": {k: v for k, v in drops.items() if v},
        "counted_drops": counted, "unaccounted": offered - forwarded - (counted - markers["among_drops"]),
        "markers": markers,
        "other_frames": {"sink": b["sink_other"] - a["sink_other"],
                         **{k: v for k, v in sw.items() if k.startswith("other_") and v}},
        "cross_check": {"tracer_xmit_drop": sw.get("xmit_drop", 0),
                        "veth_xmit_dropped": _link_delta(a, b, rt_ports + ["ext0", "ext1"]),
                        "tracer_socket_full": sw.get("socket_full", 0)},
        # what the runtimes' counters say reached the flows' actors, and what the switch handled
        # for them alone (offloaded flows: forwarded or dropped in XDP, folded into the actors)
        "to_actors": total("frames") - total("markers") - non_chain - drops["runtime_held_not_sent"],
        "in_switch": sw.get("off_forward", 0) + drops["switch_offload_drop"],
        # observe mode: forwarded frames copied for the observing NFs, and the copies lost (a gap in what they saw)
        "observe_copies": sw.get("off_observed", 0), "observe_lost": sw.get("off_observe_lost", 0),
        "runtimes": {rt: {k: v for k, v in d.items() if v} for rt, d in rts.items()},
        "per_runtime": _per_runtime(a, b, rts, pending),
    }


def _flows_of(name: str, rt_ids: list[int], keys: set[str], detail: bool) -> list[dict]:
    out = []
    for i in rt_ids:
        out += [a for a in nodectl.runtime_flows(name, i, detail=detail, timeout=30.0) or [] if a["key"] in keys]
    return out


def nf_checks(name: str, rt_ids: list[int], keys: set[str], chain: list[str], acc: dict,
              strict: bool = True, observe: bool = False) -> dict:
    """The NFs' own counts for the trial's flows against the frames that
    reached them; `problems` lists what makes the trial invalid (nothing
    when not strict: a crash loses state by design).  observe: the chain's
    rule asks for observe mode (http_parser fed copies)."""
    actors = _flows_of(name, rt_ids, keys, detail=bool(chain))
    packets = sum(a["packets"]["orig"] + a["packets"]["reply"] for a in actors)
    dropped = sum(a.get("dropped", 0) for a in actors)
    in_switch = acc.get("in_switch", 0)
    out = {"flows": len(keys), "actors": len(actors), "frames_to_actors": packets,
           "runtime_counters_say": acc["to_actors"], "switch_handled": in_switch, "dropped_by_actors": dropped,
           "offloaded_flows": sum(1 for a in actors if a.get("offload")),
           "not_offloaded_because": sorted({a["offload_reason"] for a in actors
                                            if not a.get("offload") and a.get("offload_reason")}),
           "nf_errors": sum(a.get("nf_errors", 0) for a in actors)}
    problems = []
    if packets != acc["to_actors"] + in_switch:
        problems.append(f"actors counted {packets} frames, the runtimes' counters {acc['to_actors']} "
                        f"and the switch {in_switch}")
    chain_drops = acc["drops"].get("runtime_dropped_chain", 0) + acc["drops"].get("switch_offload_drop", 0)
    if dropped != chain_drops:
        problems.append(f"actors dropped {dropped}, the runtimes and the switch counted {chain_drops} chain drops")
    if len(actors) > len({a['key'] for a in actors}):
        problems.append("a flow has an actor on two runtimes")
    if out["nf_errors"]:
        problems.append(f"{out['nf_errors']} NF errors")
    nfs = [a.get("nfs") or {} for a in actors]
    if "flow_monitor" in chain:
        fm = out["flow_monitor_packets"] = sum(n["flow_monitor"]["packets"]["orig"] +
                                               n["flow_monitor"]["packets"]["reply"] for n in nfs)
        if fm != packets:
            problems.append(f"flow_monitor counted {fm} of {packets} frames")
    if "http_parser" in chain:
        hp = [n["http_parser"] for n in nfs]
        req = out["http_requests"] = sum(h["n_requests"] for h in hp)
        out["http_errors"] = sum(h["n_errors"] for h in hp)
        out["http_desync_flows"] = sum(1 for h in hp if not all(h["in_sync"].values()))
        gaps = out["http_observe_gaps"] = sum(h.get("observe_gaps", 0) for h in hp)
        if observe:
            # every frame the switch forwarded was copied and read, or counted lost: a gap in the
            # parser's state (which then stops parsing that direction, as after a loss inline)
            copies = out["observed_copies"] = sum(a.get("observed_copies", 0) for a in actors)
            if copies + gaps != in_switch:
                problems.append(f"{copies} copies read and {gaps} lost, of {in_switch} frames the switch forwarded")
            if gaps != acc.get("observe_lost", 0):
                problems.append(f"the parsers counted {gaps} lost copies, the switch {acc.get('observe_lost')}")
            ok_flows = [h for h in hp if not h.get("observe_gaps")]
            if len(ok_flows) == len(hp) and req != packets - dropped:
                problems.append(f"http_parser parsed {req} requests of {packets - dropped} frames, none lost")
            if any(h["n_errors"] for h in ok_flows):
                problems.append("http_parser: errors in a flow that lost no copy")
        else:
            # every frame is one request; only NFs before the parser drop
            if req != packets - dropped:
                problems.append(f"http_parser parsed {req} requests of {packets - dropped} frames")
            if out["http_errors"] or out["http_desync_flows"]:
                problems.append(f"http_parser: {out['http_errors']} errors, {out['http_desync_flows']} flows "
                                f"out of sync")
    out["ok"] = not problems
    if strict:
        out["problems"] = problems
    else:
        out["differences"] = problems
    return out


__all__ = ["account", "link_stats", "nf_checks", "runtime_counts", "runtime_deltas", "snapshot"]
