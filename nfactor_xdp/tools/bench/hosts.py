"""`nfactorctl bench hosts`: runtimes on worker hosts against runtimes on
the ingress host, in the same run (docs/architecture.md, Hosts).

  rates      the forward rate (no NF, as fast as the generator goes) and the
             full chain's zero-loss rate, with one runtime on the ingress
             host, then with one on a worker host (its frames over the
             fabric, encapsulated);
  migration  every flow of one runtime migrated under traffic, between two
             runtimes of the ingress host, then between two worker hosts;
  failure    a worker host's failure under its flows' traffic, per flow
             count: every process of the host killed with -9 and its fabric
             link down; when the controller fenced it, when the runtime
             holding the flows' snapshots (on the ingress host) had taken
             them, and the frames lost.

On one machine the hosts are namespaces sharing its CPUs: a worker host adds
no capacity, and its rates show what the fabric path costs a frame (two more
veths and a bridge each way, the encapsulation), not what separate machines
would carry.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from ...control import node_client as nodectl
from ...formats.config import NodeConfig
from ...formats.messages import MsgType
from .harness import BackgroundLoad, Bench, ratios, rt_status
from .migration import PAPER_CHAIN, _migration_trial

HOST_K = 10  # snapshots every K packets, as in bench replication


def _up(b: Bench, where: str, runtimes: int, **config) -> list[int]:
    """A fresh node with `runtimes` runtimes on the ingress host, or one on
    each of `runtimes` worker hosts; returns their ids."""
    if where == "ingress":
        b.node_up(runtimes, **config)
    else:
        b.node_up_hosts(0, {h: 1 for h in range(1, runtimes + 1)}, **config)
    return list(b.rt_ids)


def _rates(b: Bench, where: str, seconds: float, trial: float, steps: int, ceilings: dict) -> dict:
    m = {"label": f"1 runtime on the {where} host", "where": where}
    try:
        m["runtimes"] = _up(b, where, 1)
        b.set_chain([])
        b.measuring(f"{m['label']}: forward")
        fwd = b.trial(0, seconds, tcp=False)
        m["forward"] = {**fwd, **ratios(fwd["forwarded_mpps"], ceilings, "max_forwarded_mpps")}
        b.set_chain(PAPER_CHAIN)
        b.measuring(f"{m['label']}: {'->'.join(PAPER_CHAIN)}")
        z = b.zero_loss(tcp=True, seconds=trial, steps=steps)
        m["full_chain"] = {**z, **ratios(z["zero_loss_mpps"], ceilings, "zero_loss_mpps")}
    except (nodectl.NodeCtlError, RuntimeError) as e:
        m["error"] = str(e)[:300]
    return m


def _migration(b: Bench, where: str, flows: int, rate: float) -> dict:
    m = {"label": f"{flows} flows x {rate} pps, {'one host' if where == 'ingress' else 'host 1 to host 2'}",
         "where": where}
    try:
        ids = _up(b, where, 2, idle_timeout=NodeConfig.idle_timeout)
        b.set_chain(PAPER_CHAIN)
        b.measuring(m["label"])
        m.update(_migration_trial(b, flows, rate, budget=1.0 + flows * 0.001, cap=NodeConfig.max_migrations,
                                  src=ids[0], dst=ids[1]), runtimes=ids)
    except (nodectl.NodeCtlError, RuntimeError) as e:
        m["error"] = str(e)[:300]
    return m


def _controller_stats(name: str) -> dict:
    try:
        return nodectl.control_call(name, "control", MsgType.STATUS, {}, timeout=0.2).get("stats") or {}
    except nodectl.NodeCtlError:
        return {}


def _kill_host(ns: str) -> int:
    """Every process of the host's namespace killed with -9, its fabric link down."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "-n", ns, "link", "set", "fab0", "down"], check=True)
    return len(pids)


def _failure_trial(b: Bench, flows: int, total_pps: float, tail: float, fill_timeout: float) -> dict:
    """`flows` UDP flows at `total_pps` through runtime 0 (ingress host) and
    runtime 8 (worker host 1), flow_monitor, K=10; once runtime 0 holds a
    snapshot of each of runtime 8's flows, host 1 dies."""
    # failure detection as a node has it by default (the other trials allow 10 missed heartbeats)
    b.node_up_hosts(1, {1: 1}, snapshot_every=HOST_K, idle_timeout=NodeConfig.idle_timeout,
                    miss_limit=NodeConfig.miss_limit)
    b.set_chain(["flow_monitor"])
    fl = b.new_flows(flows, tcp=False)
    snaps = b.begin(fl)
    rotation = flows / total_pps
    seconds = round((HOST_K + 1) * rotation + 1.0 + tail, 2)
    out = {"flows": flows, "requested_pps": total_pps, "rate_per_flow_pps": round(total_pps / flows, 2),
           "generator_seconds": seconds, "snapshot_every": HOST_K}
    load = BackgroundLoad(b.gen, b.frame(fl), rate=total_pps, seconds=seconds, base=fl.base, flows=flows, tcp=False)
    t0 = time.monotonic()
    try:
        deadline = t0 + (HOST_K + 1) * rotation + fill_timeout
        while True:  # runtime 0 holds a snapshot of each of runtime 8's flows
            s8, s0 = rt_status(b.name, 8), rt_status(b.name, 0)
            on8 = s8.get("flows") or 0
            holding = int(((s0.get("replication") or {}).get("holding") or {}).get("8", 0))
            if (on8 and holding >= on8 and (s0.get("flows") or 0) + on8 >= flows) or time.monotonic() > deadline \
                    or not load.running():
                break
            time.sleep(0.1)  # polling the runtimes with a deadline
        out.update(actors_before={"rt0": s0.get("flows"), "rt8": on8}, holding_before=holding,
                   ready_seconds=round(time.monotonic() - t0, 2))
        if not load.running() or holding < on8 or not on8:
            raise RuntimeError(f"not ready before the host failed: runtime 0 holds {holding} snapshots of runtime "
                               f"8's {on8} flows")
        snaps.append(b.snap())
        t_kill = time.monotonic()
        out["processes_killed"] = _kill_host(b.workers[1])
        t_fenced = t_taken = None
        took = {}
        deadline = t_kill + 30.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if t_fenced is None and _controller_stats(b.name).get("hosts_fenced"):
                t_fenced = now
            took = rt_status(b.name, 0).get("takeover") or {}
            if t_fenced is not None and took.get("peers") and not took.get("working"):
                t_taken = time.monotonic()
                break
            time.sleep(0.005)  # polling the controller and the taker with a deadline
        out.update(fenced_s=round(t_fenced - t_kill, 4) if t_fenced else None,
                   taken_s=round(t_taken - t_kill, 4) if t_taken else None,
                   takeover_stats=took, actors_taken=took.get("taken", 0),
                   traffic_throughout=bool(t_taken) and load.running())
    finally:
        load.join(seconds + 30)
    # (host 1's runtime answers no more; its switch's pinned maps and its namespace's links are still read)
    trial = b.end(snaps, fl, load.outcome(), total_pps, strict=False)
    # frames the ingress sent to host 1 and never got back died there, or on its link, down; those
    # host 1 counted as dropped before it died (its socket gone, its link) are counted drops already
    died = trial["per_runtime"].get(8, {}).get("not_explained", 0)
    counted_there = sum(v for k, v in trial["drops"].items()
                        if k in ("runtime_no_socket", "fabric_dropped") or k.startswith("h1_"))
    out["died_counted_by_host"] = counted_there
    if died - counted_there == trial["unaccounted"]:
        trial["invalid_because"] = [p for p in trial["invalid_because"] if "unaccounted" not in p]
        trial["valid"] = not trial["invalid_because"]
    out.update(lost_across_failure=trial["lost"], lost_with_host=died, trial=trial,
               actors_lost=(out["actors_before"]["rt8"] or 0) - out["actors_taken"])
    return out


def run_hosts_bench(flow_counts=(1000, 10000), seconds: float = 5.0, trial: float = 1.0, steps: int = 6,
                    migration_flows: int = 100, migration_rate: float = 50.0, failure_pps: float = 40_000,
                    tail: float = 3.0, fill_timeout: float = 15.0, max_fill_seconds: float = 30.0,
                    name: str = "bench", progress=None) -> dict:
    t_start = time.monotonic()
    with Bench(name, progress=progress, hosts=2) as b:
        result = b.report("hosts", {
            "mode": "forward: UDP as fast as the generator goes; full chain: TCP, every frame an HTTP request, "
                    "zero-loss search; migration: TCP paced; failure: UDP paced, flow_monitor, K=10",
            "frame_bytes": len(b.frame(b.new_flows(1, False))), "chain": PAPER_CHAIN,
            "hosts": "namespaces on one machine, on a Linux bridge (MTU 1600): they share its CPUs",
            "meaning": "ingress against worker is the fabric path's cost per frame (encapsulation, two more "
                       "veths and a bridge each way), not the capacity separate machines would add"})
        ceilings = b.ceilings(trial, tcp=True, steps=steps)
        result["ceilings"] = ceilings
        rates = [_rates(b, where, seconds, trial, steps, ceilings) for where in ("ingress", "worker")]
        for m in rates[1:]:
            for key, figure in (("forward", "forwarded_mpps"), ("full_chain", "zero_loss_mpps")):
                base = (rates[0].get(key) or {}).get(figure)
                if base and m.get(key):
                    m[key]["of_ingress_host"] = round(m[key][figure] / base, 3)
        result["rates"] = rates
        result["migration"] = [_migration(b, where, migration_flows, migration_rate)
                               for where in ("ingress", "worker")]
        fails = []
        for n in flow_counts:
            m = {"label": f"host 1 fails, {n} flows", "flows": n}
            need = (HOST_K + 1) * n / failure_pps
            if need > max_fill_seconds:
                m.update(skipped=True, reason=f"{need:.0f}s of traffic before every flow has a snapshot")
            else:
                try:
                    b.measuring(m["label"])
                    m.update(_failure_trial(b, n, failure_pps, tail, fill_timeout), skipped=False)
                except (nodectl.NodeCtlError, RuntimeError) as e:
                    m.update(skipped=False, error=str(e)[:300])
            fails.append(m)
        result["failure"] = fails
        result["run"] = {"flow_counts": list(flow_counts), "seconds": round(time.monotonic() - t_start, 1)}
        return result
