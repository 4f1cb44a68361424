"""Starting, stopping and querying a node from another process (the CLI,
the demo, the benchmarks and the tests all go through here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..kern import layouts as L
from . import supervisor as node_mod
from ..kern import netns
from ..formats import config as nodeconf, query as rtctl
from ..kern.maps import NodeMaps
from ..formats.config import NodeConfig
from ..formats.messages import ClusterKey, Endpoint, MessageTimeout, MsgType
from ..dataplane.rules import Policy, load_policy, save_policy
from ..errors import NFactorError

START_TIMEOUT = 60.0


class NodeCtlError(NFactorError):
    pass


def _log_tail(name: str, path: str | None = None, lines: int = 15) -> str:
    path = path or nodeconf.log_path(name)
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def agent_alive(name: str) -> bool:
    state = nodeconf.read_state(name)
    return bool(state) and node_mod._pid_alive(state.get("agent_pid"))


def start(cfg: NodeConfig, timeout: float = START_TIMEOUT) -> dict:
    """Start the node agent in the background and wait until it runs."""
    cfg.validate()
    if os.geteuid() != 0:
        raise NodeCtlError("the node needs root (XDP, bpffs, veths)")
    if agent_alive(cfg.name):
        raise NodeCtlError(f"node {cfg.name!r} is already up (nfactorctl down --name {cfg.name})")
    if nodeconf.read_state(cfg.name):
        # A previous agent died: clear what it left running, keep the pins.
        state = nodeconf.read_state(cfg.name) or {}
        pids = [r["pid"] for r in state.get("runtimes", []) if r.get("pid")]
        pids.append((state.get("controller") or {}).get("pid"))
        pids.append((state.get("switch_agent") or {}).get("pid"))
        node_mod.stop_processes([p for p in pids if p and node_mod._pid_alive(p)])
    os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
    logpath = nodeconf.log_path(cfg.name)
    with open(logpath, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nfactor_xdp.control.supervisor", "--config-json", json.dumps(cfg.to_dict())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NodeCtlError(f"node {cfg.name!r} failed to start:\n{_log_tail(cfg.name, logpath)}")
        state = nodeconf.read_state(cfg.name)
        if state and state.get("phase") == "running" and state.get("agent_pid") == proc.pid:
            return state
        time.sleep(0.05)  # polling the agent's state file with a deadline
    stop(cfg.name)
    raise NodeCtlError(f"node {cfg.name!r} not running after {timeout}s:\n{_log_tail(cfg.name, logpath)}")


def stop(name: str, timeout: float = 30.0, purge: bool = False) -> list[str]:
    """Stop a node; if its agent is gone, clean up what it left.  Returns what
    the forced cleanup removed (empty when the agent did it itself)."""
    state = nodeconf.read_state(name)
    if state and node_mod._pid_alive(state.get("agent_pid")):
        pid = state["agent_pid"]
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while node_mod._pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the agent's exit with a deadline
        if node_mod._pid_alive(pid):
            os.kill(pid, 9)
    removed = []
    if nodeconf.read_state(name) is not None or purge or NodeMaps(name).exists():
        removed = node_mod.force_down(name)
    return removed


def _endpoint(ns: str | None = None) -> Endpoint:
    """An endpoint on the node's control network: its loopback is that of the
    node's namespace (a socket stays in the namespace it was made in)."""
    with netns.entered(ns if ns and netns.exists(ns) else None):
        return Endpoint(("127.0.0.1", 0), ClusterKey.load_or_create(nodeconf.cluster_key_path()), "nfactorctl")


def control_call(name: str, to: str, msg_type, body: dict, timeout: float = 1.0) -> dict:
    """A request to the node's controller or supervisor (to: 'control' or 'supervisor')."""
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up")
    port = state.get(f"{to}_port")
    if not port:
        raise NodeCtlError(f"node {name!r} has no {to} address in its state")
    ep = _endpoint((state.get("config") or {}).get("netns"))
    try:
        reply = ep.call(("127.0.0.1", port), msg_type, body, timeout=timeout, retries=3)
    except MessageTimeout as e:
        raise NodeCtlError(str(e)) from None
    finally:
        ep.close()
    if reply.body.get("ok") is False:
        raise NodeCtlError(reply.body.get("error", "refused"))
    return reply.body


def runtime_query(name: str, rt_id: int, op: str, timeout: float = 0.5, **args) -> dict | None:
    try:
        return rtctl.request(nodeconf.runtime_socket(name, rt_id), op, timeout=timeout, **args)
    except rtctl.RtctlError:
        return None


def status(name: str) -> dict:
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up (no {nodeconf.state_path(name)})")
    out = {"node": name, "phase": state.get("phase"), "agent_pid": state.get("agent_pid"),
           "agent_alive": node_mod._pid_alive(state.get("agent_pid")),
           "config": state.get("config"), "xdp_modes": state.get("xdp_modes"),
           "redirect_error_tracer": state.get("tracer"), "runtimes": [], "switch": {}}
    with NodeMaps(name) as maps:
        table = maps.runtime_table() if maps.exists() else {}
        out["switch"] = maps.counters() if maps.exists() else {}
        out["switch_flows"] = sum(1 for _ in maps["flows"].keys()) if maps.exists() else 0
    try:
        ctl = control_call(name, "control", MsgType.STATUS, {}, timeout=0.3)
        view = {e["id"]: e for e in ctl["view"]["runtimes"]}
        out["controller"] = {"pid": ctl.get("pid"), "alive": True, "view_version": ctl["view"]["version"],
                             "stats": ctl.get("stats"), "rejected": ctl.get("rejected"), "log": ctl.get("log"),
                             "rules": len(ctl.get("policy", {}).get("rules", [])),
                             "restarts": (state.get("controller") or {}).get("restarts", 0)}
    except NodeCtlError:
        view = {}
        out["controller"] = {"alive": False, "restarts": (state.get("controller") or {}).get("restarts", 0)}
    for rt in state.get("runtimes", []):
        entry = dict(rt)
        entry["process"] = entry.pop("state")
        v = view.get(rt["id"], {})
        entry["state"] = v.get("state", "unknown")
        entry["load"] = v.get("load", {})
        entry["switch_state"] = table.get(rt["id"], {}).get("state", "none")
        entry["switch"] = table.get(rt["id"], {}).get("switch", {})
        live = runtime_query(name, rt["id"], "status")
        entry["live"] = live is not None
        if live:
            for k in ("pid", "flows", "frames", "forwarded", "dropped", "dropped_by_chain", "dropped_not_flow",
                      "flows_created", "flows_expired", "idle_waits", "xsk", "uptime", "replication", "migration",
                      "control_errors"):
                entry[k] = live.get(k)
        out["runtimes"].append(entry)
    return out


def flows(name: str, limit: int | None = None) -> dict:
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up")
    with NodeMaps(name) as maps:
        placed = {f["key"]: f for f in maps.flows()}
    actors = {}
    for rt in state.get("runtimes", []):
        reply = runtime_query(name, rt["id"], "flows", limit=limit)
        for a in (reply or {}).get("flows", []):
            actors[a["key"]] = dict(a, runtime=rt["id"])
    out = []
    for key in sorted(set(placed) | set(actors)):
        p, a = placed.get(key), actors.get(key)
        entry = {
            "key": key, "flow": (p or a)["flow"],
            "switch_runtime": p["runtime"] if p else None,
            "runtime": a["runtime"] if a else None,
            "packets": a["packets"] if a else None, "bytes": a["bytes"] if a else None,
        }
        if a:
            for k in ("chain", "rule", "dropped", "closed", "nfs", "nf_errors", "errors", "replica",
                      "snapshot_version", "migrating"):
                if k in a:
                    entry[k] = a[k]
        out.append(entry)
        if limit and len(out) >= limit:
            break
    return {"node": name, "flows": out}


def migrate(name: str, src: int, dst: int, *, count: int | None = None, keys: list[str] | None = None,
            timeout: float = 120.0) -> dict:
    """Migrate flows of runtime `src` to `dst` (all, `count` of them, or the
    given keys) and wait until every migration has finished."""
    args = {"to": dst}
    if keys:
        args["keys"] = keys
    elif count is not None:
        args["count"] = count
    try:
        started = rtctl.request(nodeconf.runtime_socket(name, src), "migrate", timeout=5.0, **args)
    except rtctl.RtctlError as e:
        raise NodeCtlError(f"runtime {src}: {e}") from None
    deadline = time.monotonic() + timeout
    report = started
    while not report.get("done"):
        if time.monotonic() > deadline:
            raise NodeCtlError(f"migrations not finished after {timeout}s: {report}")
        time.sleep(0.01)  # polling the source runtime with a deadline
        try:
            report = rtctl.request(nodeconf.runtime_socket(name, src), "migrate_status", batch=started["batch"])
        except rtctl.RtctlError as e:
            raise NodeCtlError(f"runtime {src}: {e}") from None
    return report


def get_policy(name: str) -> Policy:
    path = nodeconf.policy_path(name)
    return load_policy(path) if os.path.exists(path) else Policy()


def put_policy(name: str, policy: Policy) -> list[int]:
    """Save a node's policy and, if it is up, hand it to the controller, which
    logs it and pushes it to every runtime; returns the runtimes it went to."""
    save_policy(policy, nodeconf.policy_path(name))
    if not agent_alive(name):
        return []
    reply = control_call(name, "control", MsgType.RULES, {"policy": policy.to_dict()})
    return reply.get("pushed_to", [])


def counters_doc() -> dict[str, str]:
    return dict(L.COUNTER_DOCS)
