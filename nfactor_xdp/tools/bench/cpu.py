"""Where a trial's CPU time went: per CPU (/proc/stat: user, system,
softirq, idle) and per process (the generator, each runtime, the node's
other processes, ksoftirqd), so that per-core capacity can be read even
where a runtime shares a CPU with the generator.

This kernel accounts softirq time by tick sampling (no
CONFIG_IRQ_TIME_ACCOUNTING on the test VMs): receive processing run inline
when the generator re-enables bottom halves shows up as that CPU's softirq
time, or as the generator's system time; both are reported.  Other load
(someone else's processes, maybe in another container, or the hypervisor's
steal) shows as the time our pinned processes waited for their CPU: a trial
it disturbed is flagged, and the zero-loss search runs it again."""
from __future__ import annotations

import os
import time

from ...formats import config as nodeconf

TICK = os.sysconf("SC_CLK_TCK")
DISTURBED_SHARE = 0.08  # other load above this share of a CPU (ticks are 10 ms: well above the noise)
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the first is the
    state, field 3 of proc(5)); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _ksoftirqd() -> dict[str, int]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("ksoftirqd/"):
            out[comm] = int(pid)
    return out


KSOFTIRQD = _ksoftirqd()


def node_pids(name: str) -> dict[str, int]:
    """The node's processes by role (rtN, switch_agent, controller, supervisor)."""
    state = nodeconf.read_state(name) or {}
    pids = {f"rt{r['id']}": r.get("pid") for r in state.get("runtimes", [])}
    for role in ("switch_agent", "controller"):
        pids[role] = (state.get(role) or {}).get("pid")
    pids["supervisor"] = state.get("supervisor_pid")
    return {k: v for k, v in pids.items() if v}


def _schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of a process's main thread."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


def sample(pids: dict[str, int]) -> dict:
    """A reading of every CPU and of the processes `pids` (label -> pid)."""
    cpus = {}
    with open("/proc/stat") as f:
        for ln in f:
            if ln.startswith("cpu") and ln[3].isdigit():
                name, *vals = ln.split()
                cpus[int(name[3:])] = dict(zip(_CPU_FIELDS, map(int, vals)))
    procs = {}
    for label, pid in {**pids, **KSOFTIRQD}.items():
        f = proc_stat(pid)
        if f:
            run, wait = _schedstat(pid)
            procs[label] = {"pid": pid, "utime": int(f[11]), "stime": int(f[12]), "last_cpu": int(f[36]),
                            "run_ns": run, "wait_ns": wait}
    return {"t": time.monotonic(), "cpus": cpus, "procs": procs}


def report(a: dict, b: dict) -> dict:
    """CPU seconds between two samples: per CPU (ticks) and per process (a
    process that was replaced in between counts from its start); `waited_s`:
    the time a process was runnable but had no CPU (the scheduler's run delay)."""
    cpus = {c: {k: round((b["cpus"][c][k] - v) / TICK, 3) for k, v in fields.items()
                if k in ("user", "system", "softirq", "idle", "steal")}
            for c, fields in a["cpus"].items() if c in b["cpus"]}
    procs = {}
    for label, p in b["procs"].items():
        q = a["procs"].get(label)
        same = q is not None and q["pid"] == p["pid"]
        q = q if same else {k: 0 for k in p}
        procs[label] = {"pid": p["pid"], "last_cpu": p["last_cpu"],
                        "user_s": round((p["utime"] - q["utime"]) / TICK, 3),
                        "system_s": round((p["stime"] - q["stime"]) / TICK, 3),
                        "waited_s": round((p["wait_ns"] - q["wait_ns"]) / 1e9, 3)}
        if not same and label in a["procs"]:
            procs[label]["replaced"] = True
    return {"seconds": round(b["t"] - a["t"], 3), "per_cpu_s": cpus, "per_process_s": procs}


def disturbance(usage: dict, placement: dict, share: float = DISTURBED_SHARE) -> dict:
    """CPU -> seconds that other load (or the hypervisor) took from the
    benchmark's process alone on that CPU, where above `share` of the trial;
    {} for an undisturbed trial.  Where the generator and a runtime share a
    CPU they wait for each other: that CPU cannot be judged."""
    on: dict[int, list[str]] = {placement["generator_cpu"]: ["generator"]}
    for rt, c in placement["runtime_cpus"].items():
        on.setdefault(c, []).append(f"rt{rt}")
    out = {}
    for c, (label, *more) in on.items():
        p = usage["per_process_s"].get(label)
        taken = (0 if more or not p else p["waited_s"]) + usage["per_cpu_s"].get(c, {}).get("steal", 0)
        if taken > share * usage["seconds"]:
            out[c] = round(taken, 3)
    return out


def runtime_cores(runtimes: int, gen_cpu: int) -> tuple[list[int], str]:
    """Cores for the runtimes, off the generator's CPU where there are enough
    CPUs; and what the placement means for the figures."""
    others = [c for c in range(os.cpu_count() or 1) if c != gen_cpu]
    if len(others) >= runtimes:
        return others[:runtimes], "every runtime on a CPU of its own, none on the generator's"
    cores = (others + [gen_cpu] * runtimes)[:runtimes]
    shared = [i for i, c in enumerate(cores) if c == gen_cpu]
    return cores, (f"runtime {', '.join(map(str, shared))} shares CPU {gen_cpu} with the generator and the "
                   f"switch's receive path (too few CPUs to keep it apart): read per-core capacity from "
                   f"each trial's per-process CPU seconds")


def runtime_cpu(cpu: dict, frames: dict[int, int]) -> dict:
    """Frames each runtime took per second of its own CPU time in the trial
    (its capacity where it was saturated, less where it waited for frames)."""
    out = {}
    for rt, n in frames.items():
        p = cpu["per_process_s"].get(f"rt{rt}")
        busy = (p["user_s"] + p["system_s"]) if p else 0
        out[rt] = {"frames": n, "cpu_s": round(busy, 3),
                   "frames_per_cpu_s": round(n / busy) if busy else None}
    return out


__all__ = ["disturbance", "node_pids", "proc_stat", "report", "runtime_cores", "runtime_cpu", "sample"]
