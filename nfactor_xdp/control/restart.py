"""Restarting a running node's processes without losing a flow or its NF
state (`nfactorctl restart`): after an upgrade of the package, whatever is
restarted runs the installed code.

  supervisor  SIGHUP: it re-executes itself (same pid) and takes the node
              over (adoption.py): programs reloaded on the same pins,
              controller, switch agent and metrics endpoint replaced, the
              runtimes kept as they run.  A dead supervisor is started again
              (`start`), which adopts the same way.
  runtime     drained for a restart: marked leaving, its flows migrate to the
              running runtimes with their NF state (the migration protocol:
              nothing lost, duplicated or reordered), then the supervisor
              starts a fresh process on the same port, which registers and
              runs.  One at a time.  A runtime with no running peer first
              gets a temporary one to take its flows, drained afterwards (so
              its flows come back): replication could not help, as a single
              runtime has no replica, and a crash loses the state since the
              last snapshot anyway.

Refused when the pinned maps are of another BPF ABI than the installed
package's: then the flows cannot be kept (docs/architecture.md, Restarts and upgrades).
"""
from __future__ import annotations

import dataclasses
import signal
import time

from ..formats import config as nodeconf
from ..formats.config import NodeConfig
from ..formats.messages import MsgType
from ..kern import layouts as L
from ..kern.maps import NodeMaps
from . import node_client as nodectl
from .node_client import NodeCtlError
from .processes import is_same, signal_process

STEP_TIMEOUT = 120.0  # seconds one step may take (a drain moves every flow of a runtime)
_POLL = 0.05  # polling the controller's view or the state file, always with a deadline


def check_abi(name: str) -> None:
    """The node's pins must be of this package's ABI: new programs and
    runtimes cannot read maps laid out for another one."""
    with NodeMaps(name) as maps:
        cfg = maps.config() if maps.exists() else None
    if cfg is not None and cfg.abi not in (0, L.C["NFX_ABI_VERSION"]):
        raise NodeCtlError(
            f"node {name!r} runs BPF ABI v{cfg.abi} and the installed package is v{L.C['NFX_ABI_VERSION']}: its "
            f"pinned flow table cannot be kept.  Move its traffic to another node first, or accept losing every "
            f"flow's state: nfactorctl down --name {name} --purge, then up (docs/architecture.md, Restarts and upgrades)")


def _wait(what: str, probe, timeout: float):
    """probe() until it returns something true (a controller that does not
    answer, restarting, counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except NodeCtlError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise NodeCtlError(f"{what}: not done after {timeout}s")
        time.sleep(_POLL)


def view(name: str) -> dict[int, dict]:
    """The controller's view: runtime id -> entry (state, pid, load, ...)."""
    reply = nodectl.control_call(name, "control", MsgType.STATUS, {}, timeout=1.0)
    return {e["id"]: e for e in reply["view"]["runtimes"]}


def _running(name: str, rt_id: int, not_pid: int | None = None, states=("running",)) -> dict | None:
    e = view(name).get(rt_id)
    return e if e and e.get("state") in states and e.get("pid") not in (None, not_pid) else None


def restart_supervisor(name: str, timeout: float = STEP_TIMEOUT) -> dict:
    """A new supervisor (this package's code) takes the node over; the runtimes keep running."""
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up")
    check_abi(name)
    asked = time.time()
    sup = state.get("supervisor")
    if signal_process(sup, signal.SIGHUP):
        def adopted():
            if not is_same(sup):
                raise NodeCtlError(f"the supervisor exited while taking node {name!r} over; the runtimes still "
                                   f"forward: see {nodeconf.log_path(name, 'supervisor')}, then nfactorctl up")
            st = nodeconf.read_state(name) or {}
            return st if st.get("phase") == "running" and (st.get("adoption") or {}).get("at", 0) >= asked else None
        deadline = time.monotonic() + timeout
        while not (st := adopted()):  # (not _wait: a supervisor that died is an error at once)
            if time.monotonic() > deadline:
                raise NodeCtlError(f"node {name!r}: the supervisor has not taken the node over after {timeout}s")
            time.sleep(_POLL)
    else:  # it was dead: a new one adopts too (the policy: saved, and in the controller's log)
        st = nodectl.start(dataclasses.replace(NodeConfig.from_dict(state["config"]), policy=None), timeout=timeout)
    return {"pid": st["supervisor_pid"], "adoption": st.get("adoption"),
            "controller_pid": (st.get("controller") or {}).get("pid"),
            "switch_agent_pid": (st.get("switch_agent") or {}).get("pid")}


def restart_runtime(name: str, rt_id: int, timeout: float = STEP_TIMEOUT) -> dict:
    """Replace runtime rt_id's process, its flows migrated away first (and,
    when it runs alone, back through a temporary runtime)."""
    check_abi(name)
    if not nodectl.supervisor_alive(name):  # it replaces the process: without it the drain would end in nothing
        raise NodeCtlError(f"node {name!r} has no running supervisor: nfactorctl restart --supervisor (or up) first")
    if rt_id not in view(name):
        raise NodeCtlError(f"node {name!r} has no runtime {rt_id}")
    # leaving: a drain under way (a restart that timed out, say), which this one takes up
    entry = _wait(f"runtime {rt_id} running", lambda: _running(name, rt_id, states=("running", "leaving")), timeout)
    old = entry["pid"]
    out = {"id": rt_id, "old_pid": old, "flows": (entry.get("load") or {}).get("flows")}
    started = time.monotonic()
    temp = None
    if not any(e.get("state") == "running" for i, e in view(name).items() if i != rt_id):
        temp = nodectl.control_call(name, "supervisor", MsgType.RUNTIME_ADD, {}, timeout=5.0)["id"]
        _wait(f"temporary runtime {temp} running", lambda: _running(name, temp), timeout)
        out["through"] = temp
    nodectl.control_call(name, "control", MsgType.RUNTIME_STOP, {"id": rt_id, "drain": True, "restart": True})
    entry = _wait(f"runtime {rt_id} drained and started again", lambda: _running(name, rt_id, not_pid=old), timeout)
    out["new_pid"] = entry["pid"]
    if temp is not None:
        nodectl.control_call(name, "control", MsgType.RUNTIME_STOP, {"id": temp, "drain": True})
        _wait(f"temporary runtime {temp} drained", lambda: temp not in view(name), timeout)
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def restart(name: str, runtimes: list[int] = (), supervisor: bool = False, everything: bool = False,
            timeout: float = STEP_TIMEOUT, progress=lambda step: None) -> dict:
    """The supervisor (with the controller and switch agent) if asked or
    `everything`, then the runtimes asked (every runtime: `everything`), one
    at a time; progress(step) after each step."""
    if nodeconf.read_state(name) is None:
        raise NodeCtlError(f"node {name!r} is not up")
    check_abi(name)
    report = {"node": name, "runtimes": []}
    if supervisor or everything:
        report["supervisor"] = restart_supervisor(name, timeout)
        progress({"supervisor": report["supervisor"]})
    for rt_id in sorted(view(name)) if everything else runtimes:
        step = restart_runtime(name, rt_id, timeout)
        report["runtimes"].append(step)
        progress({"runtime": step})
    return report
