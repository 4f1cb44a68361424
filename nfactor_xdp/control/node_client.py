"""Starting, stopping and querying a node from another process (the CLI,
the demo, the benchmarks and the tests all go through here)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from ..dataplane.rules import Policy, load_policy, save_policy
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats import flowkey, query
from ..formats.config import NodeConfig
from ..formats.messages import ClusterKey, Endpoint, MessageTimeout, MsgType
from ..kern.maps import NodeMaps
from .processes import ISOLATED_CWD, is_same, module_command, signal_process
from .supervisor import check_policy, force_down, stop_leftovers

START_TIMEOUT = 60.0
_POLL = 0.05  # polling the supervisor's state file or exit, always with a deadline
# who control_call can ask, and the name of its control socket
ROLES = {"control": "controller", "supervisor": "supervisor", "switch": "switch"}


class NodeCtlError(NFactorError):
    pass


def _log_tail(name: str, path: str | None = None, lines: int = 15) -> str:
    path = path or nodeconf.log_path(name)
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def supervisor_alive(name: str) -> bool:
    """The supervisor recorded in the node's state still runs (the very
    process: a pid reused since by another process does not count)."""
    state = nodeconf.read_state(name)
    return bool(state) and is_same(state.get("supervisor"))


def start(cfg: NodeConfig, timeout: float = START_TIMEOUT) -> dict:
    """Start the node's supervisor in the background and wait until the node runs."""
    cfg.validate()
    if os.geteuid() != 0:
        raise NodeCtlError("the node needs root (XDP, bpffs, veths)")
    if supervisor_alive(cfg.name):
        raise NodeCtlError(f"node {cfg.name!r} is already up (nfactorctl down --name {cfg.name})")
    if cfg.policy:
        cfg.policy = os.path.abspath(cfg.policy)  # the supervisor starts in ISOLATED_CWD
    check_policy(cfg)  # here too, to say so before anything starts
    state = nodeconf.read_state(cfg.name)
    if state:
        # A previous supervisor died: clear what it left running, keep the pins.
        stop_leftovers(state)
    os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
    logpath = nodeconf.log_path(cfg.name, "supervisor")
    with open(logpath, "ab") as log:
        proc = subprocess.Popen(
            module_command("nfactor_xdp.control.supervisor", "--config-json", cfg.to_json()), cwd=ISOLATED_CWD,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NodeCtlError(f"node {cfg.name!r} failed to start:\n{_log_tail(cfg.name, logpath)}")
        state = nodeconf.read_state(cfg.name)
        if state and state.get("phase") == "running" and state.get("supervisor_pid") == proc.pid:
            return state
        time.sleep(_POLL)
    stop(cfg.name)
    raise NodeCtlError(f"node {cfg.name!r} not running after {timeout}s:\n{_log_tail(cfg.name, logpath)}")


def stop(name: str, timeout: float = 30.0, purge: bool = False) -> list[str]:
    """Stop a node; if its supervisor is gone, clean up what it left.  Returns
    what the forced cleanup removed (empty when the supervisor did it itself)."""
    state = nodeconf.read_state(name)
    sup = (state or {}).get("supervisor")
    if signal_process(sup, signal.SIGTERM):  # never a process that merely reuses the recorded pid
        deadline = time.monotonic() + timeout
        while is_same(sup) and time.monotonic() < deadline:
            time.sleep(_POLL)
        signal_process(sup, signal.SIGKILL)
    removed = []
    if nodeconf.read_state(name) is not None or purge or NodeMaps(name).exists():
        removed = force_down(name)
    return removed


def _endpoint(name: str) -> Endpoint:
    """A client's endpoint among the node's control sockets: a name of its
    own (removed when closed) in the node's root-only control directory."""
    path = nodeconf.control_socket(name, f"cli-{os.getpid()}-{os.urandom(4).hex()}")
    return Endpoint(path, ClusterKey.load_or_create(nodeconf.cluster_key_path()), "nfactorctl")


def control_call(name: str, to: str, msg_type, body: dict, timeout: float = 1.0) -> dict:
    """A request to the node's controller, supervisor or switch agent (to:
    'control', 'supervisor' or 'switch')."""
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up")
    ep = _endpoint(name)
    try:
        reply = ep.call(nodeconf.control_socket(name, ROLES[to]), msg_type, body, timeout=timeout, retries=3)
    except MessageTimeout as e:
        raise NodeCtlError(str(e)) from None
    finally:
        ep.close()
    if reply.body.get("ok") is False:
        raise NodeCtlError(reply.body.get("error", "refused"))
    return reply.body


def runtime_query(name: str, rt_id: int, op: str, timeout: float = 0.5, **args) -> dict | None:
    try:
        return query.request(nodeconf.runtime_socket(name, rt_id), op, timeout=timeout, **args)
    except query.QueryError:
        return None


def status(name: str) -> dict:
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up (no {nodeconf.state_path(name)})")
    out = {"node": name, "phase": state.get("phase"), "supervisor_pid": state.get("supervisor_pid"),
           "supervisor_alive": is_same(state.get("supervisor")),
           "config": state.get("config"), "xdp_modes": state.get("xdp_modes"),
           "redirect_error_tracer": state.get("tracer"), "runtimes": [], "switch": {}}
    with NodeMaps(name) as maps:
        table = maps.runtime_table() if maps.exists() else {}
        out["switch"] = maps.counters() if maps.exists() else {}
        out["switch_flows"] = sum(1 for _ in maps["flows"].keys()) if maps.exists() else 0
    # restarts, restarts in a row, the delay before the next, and why it last exited
    procs = {role: {k: (state.get(role) or {}).get(k) for k in ("restarts", "quick_exits", "restart_delay_s",
                                                               "last_exit")} for role in ("controller", "switch_agent")}
    out["switch_agent"] = procs["switch_agent"]
    try:
        ctl = control_call(name, "control", MsgType.STATUS, {}, timeout=0.3)
        view = {e["id"]: e for e in ctl["view"]["runtimes"]}
        out["controller"] = {"pid": ctl.get("pid"), "alive": True, "view_version": ctl["view"]["version"],
                             "stats": ctl.get("stats"), "rejected": ctl.get("rejected"), "log": ctl.get("log"),
                             "rules": len(ctl.get("policy", {}).get("rules", [])), **procs["controller"]}
    except NodeCtlError:
        view = {}
        out["controller"] = {"alive": False, **procs["controller"]}
    for rt in state.get("runtimes", []):
        entry = dict(rt)
        v = view.get(rt["id"], {})
        entry["state"] = v.get("state", "unknown")
        entry["load"] = v.get("load", {})
        entry["switch_state"] = table.get(rt["id"], {}).get("state", "none")
        entry["switch"] = table.get(rt["id"], {}).get("switch", {})
        live = runtime_query(name, rt["id"], "status")
        entry["live"] = live is not None
        if live:
            for k in ("pid", "recovering", "flows", "frames", "forwarded", "sent_later", "held", "markers",
                      "dropped", "dropped_by_chain", "dropped_not_flow", "flows_created", "flows_expired",
                      "flows_evicted", "switch_entries_deleted",
                      "idle_waits", "xsk", "uptime", "replication", "migration", "limits", "control_errors",
                      "fragments"):
                entry[k] = live.get(k)
        out["runtimes"].append(entry)
    return out


def runtime_flows(name: str, rt_id: int, limit: int | None = None, detail: bool = True,
                  timeout: float = 0.5) -> list[dict] | None:
    """The flows of runtime rt_id (at most `limit`), a page per query: it
    answers one page between two packet batches.  None if it does not answer;
    what came if it stops answering midway."""
    out, cursor = [], None
    while True:
        args = {"detail": detail, **({"cursor": cursor} if cursor else {})}
        if limit:
            args["limit"] = limit - len(out)
        reply = runtime_query(name, rt_id, "flows", timeout=timeout, **args)
        if reply is None:
            return out if cursor else None
        out += reply.get("flows", [])
        cursor = reply.get("cursor")
        if not cursor or (limit and len(out) >= limit):
            return out


def flows(name: str, limit: int | None = None) -> dict:
    state = nodeconf.read_state(name)
    if state is None:
        raise NodeCtlError(f"node {name!r} is not up")
    with NodeMaps(name) as maps:
        placed = {f["key"]: f for f in maps.flows()}
    actors = {}
    for rt in state.get("runtimes", []):
        for a in runtime_flows(name, rt["id"], limit=limit) or []:
            actors[a["key"]] = dict(a, runtime=rt["id"])
    out = []
    for key in sorted(set(placed) | set(actors)):
        p, a = placed.get(key), actors.get(key)
        entry = {
            "key": key, "flow": flowkey.describe(bytes.fromhex(key)),
            "switch_runtime": p["runtime"] if p else None,
            "runtime": a["runtime"] if a else None,
            "packets": a["packets"] if a else None, "bytes": a["bytes"] if a else None,
        }
        if a:
            for k in ("chain", "rule", "dropped", "closed", "nfs", "nf_errors", "errors", "replica",
                      "snapshot_version", "migrating", "migratable", "state_bytes"):
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
        started = query.request(nodeconf.runtime_socket(name, src), "migrate", timeout=5.0, **args)
    except query.QueryError as e:
        raise NodeCtlError(f"runtime {src}: {e}") from None
    deadline = time.monotonic() + timeout
    report = started
    while not report.get("done"):
        if time.monotonic() > deadline:
            raise NodeCtlError(f"migrations not finished after {timeout}s: {report}")
        time.sleep(0.01)  # polling the source runtime with a deadline
        try:
            report = query.request(nodeconf.runtime_socket(name, src), "migrate_status", batch=started["batch"])
        except query.QueryError as e:
            raise NodeCtlError(f"runtime {src}: {e}") from None
    return report


def get_policy(name: str) -> Policy:
    path = nodeconf.policy_path(name)
    return load_policy(path) if os.path.exists(path) else Policy()


def put_policy(name: str, policy: Policy) -> list[int]:
    """Save a node's policy and, if it is up, hand it to the controller, which
    logs it and pushes it to every runtime; returns the runtimes it went to."""
    save_policy(policy, nodeconf.policy_path(name))
    if not supervisor_alive(name):
        return []
    reply = control_call(name, "control", MsgType.RULES, {"policy": policy.to_dict()})
    return reply.get("pushed_to", [])

