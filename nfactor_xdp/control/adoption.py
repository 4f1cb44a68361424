"""Adoption: a supervisor that finds runtimes of its node still running
takes them over instead of stopping them, so a restart or an upgrade of the
supervisor, the controller and the switch agent keeps every flow's NF state.

It happens when `nfactorctl up` (or systemd) starts a supervisor after the
previous one died, and when a supervisor re-executes itself on SIGHUP
(`nfactorctl restart --supervisor`: the same pid, the installed code).

    kept:      the runtime processes (their actors, sockets and replicas),
               their ports, the pinned maps, the switch's runtime table
    replaced:  the programs (compiled again on the same pins and attached in
               place of the old ones, one atomic swap per port), the
               controller (it recovers its view from its durable log), the
               switch agent, the metrics endpoint

An adopted runtime is not the supervisor's child (unless it re-executed
itself): it is watched through a pidfd (processes.Child.adopt) and, when it
dies, restarted as any runtime is.  A recorded runtime that is no longer
running is started again and recovers its flows from the replicas.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from .. import logs
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats.config import NodeConfig
from ..kern import layouts as L
from .processes import ISOLATED_CWD, is_same, module_command, stop_processes

ADOPTABLE = ("running", "adopting")  # a node caught starting or stopping is started afresh
WIRING = ("netns", "ext0", "ext1")   # what adopted runtimes and their ports depend on

log = logs.get("supervisor")


class AdoptionError(NFactorError):
    pass


@dataclasses.dataclass
class Leftovers:
    """What a previous supervisor of the node left running."""
    runtimes: dict[int, dict]  # runtime id -> its record in the state (identity, restarts, ...)
    others: list[dict]         # identities of its other children: controller, switch agent, ...
    how: str                   # "exec" or "dead supervisor"


def recorded_children(state: dict) -> list[dict]:
    """Identities of the non-runtime children a state records (whatever their role)."""
    return [v["identity"] for k, v in state.items() if k != "runtimes" and isinstance(v, dict)
            and isinstance(v.get("identity"), dict)]


def leftovers(cfg: NodeConfig) -> Leftovers | None:
    """The runtimes to take over, if a previous supervisor of this node is
    gone (or is this process, re-executed) and left some running.  Without
    any, whatever it left is stopped (the pins stay) and None returned."""
    state = nodeconf.read_state(cfg.name)
    if not state:
        return None
    sup = state.get("supervisor")
    me = isinstance(sup, dict) and sup.get("pid") == os.getpid()
    if is_same(sup) and not me:
        raise AdoptionError(f"node {cfg.name!r} has a running supervisor (pid {sup['pid']})")
    records = {r["id"]: r for r in state.get("runtimes", []) if isinstance(r, dict) and isinstance(r.get("id"), int)}
    live = [r for r in records.values() if is_same(r.get("identity"))]
    if state.get("phase") not in ADOPTABLE or not live:
        stop_processes([r.get("identity") for r in records.values()] + recorded_children(state))
        return None
    old = state.get("config") or {}
    differ = [f for f in WIRING if old.get(f) != getattr(cfg, f)]
    if differ:
        raise AdoptionError(
            f"node {cfg.name!r} still forwards with runtimes {sorted(r['id'] for r in live)} on "
            + ", ".join(f"{f} {old.get(f)!r}" for f in differ)
            + f": start it with the same {', '.join(differ)} to take them over, or `nfactorctl down --name "
              f"{cfg.name}` first")
    if len(records) != cfg.runtimes:
        log.info("keeping the node's %d runtimes (--runtimes %d applies to a fresh start; runtime add/drain "
                 "change it)", len(records), cfg.runtimes)
    return Leftovers(records, recorded_children(state), "exec" if me else "dead supervisor")


def take_over(node, rt, record: dict, ipr) -> bool:
    """Adopt runtime `rt` as `record` describes it; True if it runs and its
    ports are there.  Otherwise it is started again like a runtime that
    died: `starting` in the switch (keeps its flows, gets no new ones) until
    it has recovered them from the replicas."""
    rt.restarts = int(record.get("restarts") or 0)
    ports = all(ipr.link_lookup(ifname=name) for name in (rt.sw, rt.port))
    if ports and rt.adopt(record.get("identity")):
        return True
    stop_processes([record.get("identity")])  # alive without its port: of no use; dead: reaped if ours
    node.maps.set_runtime_state(rt.id, L.C["NFX_RT_STARTING"])
    return False


def replace_children(node) -> None:
    """When adopting, stop the previous controller, switch agent, ... (as
    late as possible: they go on serving until their successors start)."""
    found = node.found
    if not found:
        return
    stop_processes(found.others)
    node.adoption = {"at": time.time(), "from": found.how,
                     "adopted": sorted(rt.id for rt in node.runtimes if rt.adopted),
                     "restarted": sorted(rt.id for rt in node.runtimes if not rt.adopted)}
    log.info("took over runtimes %s (%s)%s", node.adoption["adopted"],
             "re-executed" if found.how == "exec" else "their supervisor had died",
             f"; starting runtimes {node.adoption['restarted']} again" if node.adoption["restarted"] else "")


def replace(rt, drained_pid: int | None) -> bool:
    """Runtime `rt` drained for a rolling restart (its flows migrated away):
    stop its process and start a fresh one on the same port, which registers
    and runs again (`nfactorctl restart`).  A request about a process already
    replaced (a controller that asked again after a restart) is ignored."""
    if drained_pid is not None and drained_pid != rt.pid:
        return False
    rt.stop()
    rt.respawn()
    log.info("runtime %d replaced: pid %s (drained for a restart)", rt.id, rt.pid)
    return True


def let_go(node, stop_children: bool) -> None:
    """Leave the node without stopping its runtimes: programs attached, maps
    pinned, runtimes forwarding (before a re-exec, or after an adoption that
    failed: the next supervisor takes them over)."""
    if stop_children:
        for child in filter(None, (node.controller, *getattr(node, "standbys", ()), node.switch_agent,
                                   getattr(node, "metrics", None))):
            child.stop()
    for handle in (node.ep, node.maps, node.progs):
        if handle is not None:
            handle.close()


def reexec(cfg: NodeConfig) -> None:
    """Become a new supervisor of the installed code, in this process (the
    same pid: systemd's main process stays); it adopts the runtimes."""
    cfg = dataclasses.replace(cfg, policy=None)  # saved already, and in the controller's log
    argv = module_command("nfactor_xdp.control.supervisor", "--config-json", cfg.to_json())
    log.info("re-executing the supervisor: %s", " ".join(argv[:4]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.chdir(ISOLATED_CWD)
    os.execv(argv[0], argv)
