"""`nfactorctl bench replication`: state replication (paper Fig. 10).  The
zero-loss and maximal rate with flow_monitor, with and without snapshots
every K packets, per runtime count; and what becomes of a runtime killed
with -9 while its flows' traffic goes on, per flow count: with takeover on
(the default) its peer takes its flows at once, with it off they wait for the
restarted runtime to recover them; frames lost across the crash either way."""
from __future__ import annotations

import os
import time

from ...control import node_client as nodectl
from ...formats import config as nodeconf
from ...formats.config import NodeConfig
from .cpu import proc_stat
from .harness import POLL, BackgroundLoad, Bench, ratios, rt_status, runtimes_label

REPLICATION_PAPER = {"throughput_lost_ratio": 0.60, "recovery_total_s": 3.3, "recovery_fetch_replay_s": 1.2}
REPLICATION_K = 10


def _replication_totals(name: str, runtimes: int) -> dict:
    keys = ("snapshots_sent", "snapshot_messages", "shed", "refused", "stored", "stale_ignored")
    reps = [(rt_status(name, i).get("replication") or {}) for i in range(runtimes)]
    return {k: sum(r.get(k, 0) for r in reps) for k in keys}


def _view_state(name: str, rt_id: int) -> str | None:
    """Runtime rt_id's state in the controller's view (None: no answer)."""
    from ...formats.messages import MsgType
    try:
        ctl = nodectl.control_call(name, "control", MsgType.STATUS, {}, timeout=0.2)
    except nodectl.NodeCtlError:
        return None
    for e in ctl["view"]["runtimes"]:
        if e.get("id") == rt_id:
            return e.get("state")
    return "absent"


def _proc_start_boottime(pid: int) -> float | None:
    """A process's start, in seconds since boot (10 ms resolution)."""
    fields = proc_stat(pid)
    try:
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (TypeError, IndexError, ValueError):  # TypeError: the process is gone
        return None


def _recovery_trial(b: Bench, flows: int, total_pps: float, tail: float, fill_timeout: float,
                    out: dict | None = None, takeover: str = "on") -> dict:
    """`flows` UDP flows at `total_pps` in all through a 2-runtime node with K=10;
    once the node holds them and runtime 1 holds a snapshot of each of runtime 0's
    flows, kill -9 runtime 0 and time its detection, the takeover of its flows by
    runtime 1 (takeover on), its restart and recovery."""
    # the default idle timeout: a crashed runtime's flows must outlive their recovery
    b.node_with_chain(2, ["flow_monitor"], snapshot_every=REPLICATION_K, idle_timeout=NodeConfig.idle_timeout,
                      takeover=takeover)
    logs = {i: nodeconf.log_path(b.name, f"rt{i}") for i in (0, 1)}
    log_at = {i: os.path.getsize(path) for i, path in logs.items()}
    fl = b.new_flows(flows, tcp=False)
    snaps = b.begin(fl)
    rotation = flows / total_pps  # seconds for every flow to send one frame
    snap_after = (REPLICATION_K + 1) * rotation  # every flow has sent K frames: a snapshot each
    seconds = round(snap_after + 1.0 + tail, 2)
    out = {} if out is None else out  # filled as the trial goes: kept when it fails
    out.update({"flows": flows, "takeover": takeover, "requested_pps": total_pps,
                "rate_per_flow_pps": round(total_pps / flows, 2),
                "generator_seconds": seconds, "snapshot_every": REPLICATION_K})
    t0 = time.monotonic()
    load = BackgroundLoad(b.gen, b.frame(fl), rate=total_pps, seconds=seconds, base=fl.base, flows=flows, tcp=False)
    try:
        # 1. the node holds every flow
        deadline = t0 + rotation + fill_timeout
        while True:
            held = nodectl.status(b.name)["switch_flows"]
            if held >= flows or time.monotonic() > deadline or not load.running():
                break
            time.sleep(0.1)  # polling the switch's flow table with a deadline
        out.update(switch_flows=held, fill_seconds=round(time.monotonic() - t0, 2))
        if held < flows:
            raise RuntimeError(f"only {held} of {flows} flows in the switch after {time.monotonic() - t0:.1f}s")
        # 2. runtime 1 holds a snapshot of each flow of runtime 0, none pending
        deadline = t0 + snap_after + fill_timeout
        while True:
            s0, s1 = rt_status(b.name, 0), rt_status(b.name, 1)
            actors0 = s0.get("flows") or 0
            holding = int(((s1.get("replication") or {}).get("holding") or {}).get("0", 0))
            pending = (s0.get("replication") or {}).get("pending", 0)
            if (actors0 and holding >= actors0) or time.monotonic() > deadline \
                    or not load.running():
                break
            time.sleep(0.1)  # polling the runtimes with a deadline
        out.update(snapshots_wait_seconds=round(time.monotonic() - t0, 2), actors_before=[actors0,
                   s1.get("flows")], peer_holding_before=holding, pending_before=pending,
                   replication_before=_replication_totals(b.name, 2))
        if not load.running():
            raise RuntimeError(f"the generator ended before the snapshots were in place "
                               f"(peer holds {holding} of runtime 0's {actors0} flows)")
        if holding < actors0:
            out["snapshot_shortfall"] = actors0 - holding  # recorded, the trial goes on
        # 3. kill -9 runtime 0, time detection, restart, recovery
        rts = {r["id"]: r for r in nodectl.status(b.name)["runtimes"]}
        old_pid, peer_pid = rts[0]["pid"], rts[1]["pid"]
        snaps.append(b.snap())  # the killed runtime's last counters
        t_kill = time.monotonic()
        boot_kill = time.clock_gettime(time.CLOCK_BOOTTIME)
        os.kill(old_pid, 9)
        t_failed = t_running = t_taken = None
        states = []
        took = {}
        deadline = t_kill + 30.0
        while time.monotonic() < deadline:
            st = _view_state(b.name, 0)
            now = time.monotonic()
            if not states or states[-1][0] != st:
                states.append((st, round(now - t_kill, 4)))
            if t_failed is None and st not in ("running", None):
                t_failed = now
            if takeover == "on" and t_taken is None:
                took = rt_status(b.name, 1).get("takeover") or {}
                if took.get("peers") and not took.get("working"):
                    t_taken = time.monotonic()  # runtime 1 has every flow it held a snapshot of
            if t_failed is not None and st == "running" and (takeover == "off" or t_taken is not None):
                t_running = now
                break
            time.sleep(0.005)  # polling the controller's view (and the peer) with a deadline
        rec = {}
        new_pid = None
        rdeadline = time.monotonic() + 10.0
        while time.monotonic() < rdeadline:  # the restarted runtime's own report
            s0 = rt_status(b.name, 0)
            rec = (s0.get("replication") or {}).get("recovery") or {}
            new_pid = s0.get("pid")
            if rec.get("phase") == "done":
                break
            time.sleep(POLL)
        start = _proc_start_boottime(new_pid) if new_pid else None
        s1 = rt_status(b.name, 1)  # the peer's longest wait for its ring, and collector pauses
        out.update(peer_stall=s1.get("stall"), peer_gc=s1.get("gc"))
        time.sleep(1.0)  # does the recovered node stay up?
        rts = {r["id"]: r for r in nodectl.status(b.name)["runtimes"]}
        out.update(restarts_after={i: r.get("restarts") for i, r in rts.items()},
                   peer_restarted=rts[1].get("pid") != peer_pid or bool(rts[1].get("restarts")),
                   crashed_again=bool((rts[0].get("restarts") or 0) > 1 or rts[1].get("restarts")))
        out.update({
            "killed_pid": old_pid, "new_pid": new_pid,
            "detected_s": round(t_failed - t_kill, 4) if t_failed else None,
            "running_again_s": round(t_running - t_kill, 4) if t_running else None,
            # start of the process that reported the recovery, ~10 ms resolution
            "respawned_s": round(start - boot_kill, 2) if start is not None else None,
            "view_states": states,
            "recovery": rec, "recovery_seconds": rec.get("seconds"),
            # takeover on: kill -> runtime 1 has taken every flow it held (polled every 5 ms and more)
            "taken_s": round(t_taken - t_kill, 4) if t_taken else None,
            "takeover_stats": took, "actors_taken": took.get("taken", 0),
            "actors_recovered": rec.get("actors"),
            "actors_lost": actors0 - (rec.get("actors") or 0) - took.get("taken", 0),
            "actors_after": [(rt_status(b.name, i).get("flows")) for i in (0, 1)],
            "traffic_throughout": bool(t_running) and load.running(),
        })
    finally:
        load.join(seconds + 30)
        errors = {}  # what the runtimes logged during the trial, besides their start lines
        for i, path in logs.items():
            try:
                with open(path, errors="replace") as f:
                    f.seek(log_at[i])
                    lines = [ln.strip() for ln in f if ln.strip() and " running on " not in ln]
            except OSError:
                lines = []
            if lines:
                errors[f"rt{i}"] = {"lines": len(lines), "last": lines[-3:]}
        out["runtime_log_errors"] = errors
        try:
            out["restarts_total"] = {r["id"]: r.get("restarts") for r in nodectl.status(b.name)["runtimes"]}
        except nodectl.NodeCtlError:
            pass
    trial = b.end(snaps, fl, load.outcome(), total_pps, strict=False)
    # Frames the killed runtime had taken in and not yet counted died with it:
    # its share is read from the switch's side (into its socket, back out).
    died = trial["per_runtime"].get(0, {}).get("not_explained", 0) if len(snaps) > 1 else 0
    if died == trial["unaccounted"]:
        trial["invalid_because"] = [p for p in trial["invalid_because"] if "unaccounted" not in p]
        trial["valid"] = not trial["invalid_because"]
    nf = trial.get("nf_checks") or {}
    # weak consistency: what the killed runtime counted since each flow's last snapshot is gone
    out.update(lost_across_crash=trial["lost"], lost_with_killed_runtime=died, trial=trial,
               counts_lost_in_crash=nf.get("runtime_counters_say", 0) - nf.get("frames_to_actors", 0),
               counts_lost_bound=(REPLICATION_K - 1) * (out.get("actors_before") or [0])[0])
    return out


def _throughput(b: Bench, n: int, k: int, trial: float, steps: int, ceilings: dict) -> dict:
    m = {"label": f"{runtimes_label(n)}, K={k or 'off'}", "runtimes": n, "snapshot_every": k,
         "replica_peers": (n - 1) if k else 0}
    try:
        b.measuring(m["label"])
        b.node_with_chain(n, ["flow_monitor"], snapshot_every=k)
        r0 = _replication_totals(b.name, n)
        m.update(b.zero_loss(tcp=False, seconds=trial, steps=steps))
        r1 = _replication_totals(b.name, n)
        m["replication"] = {key: r1[key] - r0[key] for key in r1}
        m.update(placement=b.placement, **ratios(m["zero_loss_mpps"], ceilings, "zero_loss_mpps"))
        if k and n == 1:
            m["note"] = "one runtime: no peer to replicate to, no snapshot leaves the runtime"
    except (nodectl.NodeCtlError, RuntimeError) as e:
        m["error"] = str(e)[:300]
    return m


def run_replication_bench(counts=(1, 2), flow_counts=(1000, 10000, 50000), takeovers=("on", "off"),
                          trial: float = 1.0, steps: int = 6,
                          recovery_pps: float = 40_000, tail: float = 4.0, fill_timeout: float = 15.0,
                          max_fill_seconds: float = 30.0, name: str = "bench", progress=None) -> dict:
    """State replication (paper Fig. 10): (1) the zero-loss and maximal rate with
    flow_monitor, with and without snapshots every K=10 packets, per runtime
    count; (2) the recovery of a runtime killed with -9 while its flows' traffic
    goes on, per flow count, with its peer taking its flows over and without,
    with the frames lost across the crash; the XDP-only ceilings from the same run."""
    t_start = time.monotonic()
    with Bench(name, progress=progress) as b:
        result = b.report("replication", {
            "mode": "UDP, XDP live frames, source port rotating over each trial's own flows",
            "frame_bytes": len(b.frame(b.new_flows(1, False))),
            "chain": ["flow_monitor"], "throughput_flows": b.flows, "snapshot_every": REPLICATION_K,
            "zero_loss": "binary search over the requested rate, confirmed by a second trial; a trial passes if "
                         "it offered frames, lost none, every frame is accounted for and the NFs' counts match",
            "trial_s": trial, "search_steps": steps}, paper_reference=REPLICATION_PAPER)
        ceilings = b.ceilings(trial, steps=steps)
        result["ceilings"] = ceilings

        rows = []
        for n in counts:
            off, on = (_throughput(b, n, k, trial, steps, ceilings) for k in (0, REPLICATION_K))
            # a cost only where something is replicated: with one runtime there is no peer
            if n > 1 and off.get("zero_loss_mpps") and on.get("zero_loss_mpps") is not None:
                on["zero_loss_lost_ratio"] = round(1 - on["zero_loss_mpps"] / off["zero_loss_mpps"], 3)
            if n > 1 and off.get("max_forwarded_mpps") and on.get("max_forwarded_mpps") is not None:
                on["max_forwarded_lost_ratio"] = round(1 - on["max_forwarded_mpps"] / off["max_forwarded_mpps"], 3)
            rows += [off, on]
        result["throughput"] = rows

        rec = []
        for n in flow_counts:
            for takeover in takeovers:
                m = {"label": f"{n} flows, takeover {takeover}", "flows": n}
                need = (REPLICATION_K + 1) * n / recovery_pps
                if need > max_fill_seconds:
                    m.update(skipped=True, reason=f"{need:.0f}s of traffic at {recovery_pps:.0f} pps before every "
                                                  f"flow has a snapshot (limit {max_fill_seconds:.0f}s)")
                else:
                    try:
                        m["skipped"] = False
                        b.measuring(f"crash, {m['label']}")
                        _recovery_trial(b, n, recovery_pps, tail, fill_timeout, out=m, takeover=takeover)
                    except (nodectl.NodeCtlError, RuntimeError) as e:
                        m.update(error=str(e)[:300])
                rec.append(m)
        result["recovery"] = rec
        result["run"] = {"counts": list(counts), "flow_counts": list(flow_counts), "takeovers": list(takeovers),
                         "recovery_pps": recovery_pps,
                         "seconds": round(time.monotonic() - t_start, 1)}
        return result
