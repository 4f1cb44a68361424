"""Starting, stopping and querying a node from another process (the CLI,
the demo, the benchmarks and the tests all go through here)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from .. import logs
from ..dataplane.rules import Policy, load_policy, save_policy
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats import fabric, flowkey, query
from ..formats.config import NodeConfig
from ..formats.messages import ClusterKey, Endpoint, MessageTimeout, MsgType
from ..kern import netns
from ..kern.loader import check_features
from ..kern.maps import NodeMaps
from .coexist import owned_prog_ids, refuse_taken_ports
from .processes import ISOLATED_CWD, is_same, module_command, signal_process
from .supervisor import check_policy, force_down

START_TIMEOUT = 60.0
_POLL = 0.05  # polling the supervisor's state file or exit, always with a deadline
# who control_call can ask, and the name of its control socket
ROLES = {"control": "controller", "supervisor": "supervisor", "switch": "switch"}


class NodeCtlError(NFactorError):
    pass


def not_up(name: str) -> NodeCtlError:
    return NodeCtlError(f"node {name!r} is not up (no {nodeconf.state_path(name)}): start it with "
                        f"`nfactorctl up --name {name}`")


def _sizes(*paths: str) -> dict[str, int]:
    return {p: os.path.getsize(p) if os.path.exists(p) else 0 for p in paths}


def _last_error(since: dict[str, int]) -> str | None:
    """The supervisor's last error line written since `since` (path -> size):
    an ERROR or CRITICAL line of its log (text or JSON), else the last line
    of its standard error (an uncaught exception's last line)."""
    tail = None
    for path, start in since.items():
        try:
            with open(path, errors="replace") as f:
                f.seek(start if os.path.getsize(path) >= start else 0)  # smaller: rotated since
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            continue
        found = None
        for ln in lines:
            if ln.startswith("{"):
                try:
                    entry = json.loads(ln)
                except ValueError:
                    entry = {}
                if entry.get("level") in ("ERROR", "CRITICAL"):
                    found = entry.get("msg")
            elif " ERROR " in ln or " CRITICAL " in ln:
                found = ln.split("]: ", 1)[-1]
        if found:
            return found
        if lines and path.endswith(".stderr.log"):
            tail = lines[-1]
    return tail


def supervisor_alive(name: str) -> bool:
    """The supervisor recorded in the node's state still runs (the very
    process: a pid reused since by another process does not count)."""
    state = nodeconf.read_state(name)
    return bool(state) and is_same(state.get("supervisor"))


def _check_etcd(cfg: NodeConfig) -> None:
    """--store etcd: a member must answer from where the controllers run (the
    node's namespace), or no controller could ever lead: say so now."""
    from .cluster_store import Members, StoreError
    try:
        Members(cfg.etcd_members).call(lambda c: c.status(), retry_for=1.0)
    except StoreError as e:
        where = f" from namespace {cfg.netns}" if cfg.netns else ""
        raise NodeCtlError(f"--store etcd: {e}{where}; start etcd (or fix --etcd-endpoints) first") from None


def start(cfg: NodeConfig, timeout: float = START_TIMEOUT) -> dict:
    """Start the node's supervisor in the background and wait until the node runs."""
    cfg.validate()
    if os.geteuid() != 0:
        raise NodeCtlError("the node needs root (XDP, bpffs, veths): run nfactorctl as root")
    check_features()
    if supervisor_alive(cfg.name):
        raise NodeCtlError(f"node {cfg.name!r} is already up (nfactorctl down --name {cfg.name})")
    if cfg.policy:
        cfg.policy = os.path.abspath(cfg.policy)  # the supervisor starts in ISOLATED_CWD
    check_policy(cfg)  # here too, to say so before anything starts
    if not cfg.netns or netns.exists(cfg.netns):  # a missing one: the supervisor says so
        with netns.entered(cfg.netns):
            refuse_taken_ports(cfg, owned_prog_ids(cfg.name))  # here too, before anything starts
            if cfg.store == "etcd":
                _check_etcd(cfg)
    # A previous supervisor died: the new one takes over the runtimes it left running
    # and stops the rest (adoption.py); the pins stay.
    os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
    logpath, errpath = nodeconf.log_path(cfg.name, "supervisor"), nodeconf.stderr_log_path(cfg.name, "supervisor")
    logs.rotate_if_over(errpath, cfg.log_max_bytes, 1)
    since = _sizes(logpath, errpath)
    with open(errpath, "ab") as log:
        proc = subprocess.Popen(
            module_command("nfactor_xdp.control.supervisor", "--config-json", cfg.to_json()), cwd=ISOLATED_CWD,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NodeCtlError(f"node {cfg.name!r} failed to start: {_last_error(since) or 'no error logged'} "
                               f"(more in {logpath})")
        state = nodeconf.read_state(cfg.name)
        if state and state.get("phase") == "running" and state.get("supervisor_pid") == proc.pid:
            return state
        time.sleep(_POLL)
    stop(cfg.name)
    raise NodeCtlError(f"node {cfg.name!r} not running after {timeout}s, stopped again: "
                       f"{_last_error(since) or 'no error logged'} (more in {logpath})")


def start_worker(cfg: NodeConfig, host: int, ns: str | None, runtimes: int | None = None) -> dict:
    """Worker host `host` of the node `cfg` starts (its ingress host), in
    namespace `ns` of this machine: the testbed's simulated hosts; with
    `runtimes` runtimes (default: as many as the ingress host, at least 1)."""
    ncpu = os.cpu_count() or 1
    # the simulated hosts share this machine's CPUs: each starts on another one
    cores = cfg.cores or [(host + i) % ncpu for i in range(ncpu)]
    return start(dataclasses.replace(cfg, host_id=host, name=fabric.worker_name(cfg.name, host), netns=ns,
                                     runtimes=runtimes or max(cfg.runtimes, 1), policy=None, metrics_port=0,
                                     controllers=1, cores=cores))


def local_workers(name: str) -> list[str]:
    """The node's worker hosts that run on this machine (the testbed's)."""
    cfg = (nodeconf.read_state(name) or {}).get("config") or {}
    hosts = fabric.parse_hosts(cfg.get("hosts") or "") if not cfg.get("host_id") else []
    return [w for w in (fabric.worker_name(name, h) for h in range(1, len(hosts)))
            if nodeconf.read_state(w) is not None]


def stop(name: str, timeout: float = 30.0, purge: bool = False) -> list[str]:
    """Stop a node (and its worker hosts that run on this machine); if its
    supervisor is gone, clean up what it left.  Returns what the forced
    cleanup removed (empty when the supervisor did it itself)."""
    removed = []
    for worker in local_workers(name):
        removed += stop(worker, timeout)
    state = nodeconf.read_state(name)
    sup = (state or {}).get("supervisor")
    if signal_process(sup, signal.SIGTERM):  # never a process that merely reuses the recorded pid
        deadline = time.monotonic() + timeout
        while is_same(sup) and time.monotonic() < deadline:
            time.sleep(_POLL)
        signal_process(sup, signal.SIGKILL)
    if nodeconf.read_state(name) is not None or purge or NodeMaps(name).exists():
        removed = force_down(name)
    return removed


def _endpoint(cfg: NodeConfig) -> Endpoint:
    """A client's endpoint among the node's control sockets: a name of its
    own (removed when closed) in the node's root-only control directory; with
    hosts, a free UDP port on this host's fabric address."""
    addr = nodeconf.control_address(cfg, f"cli-{os.getpid()}-{os.urandom(4).hex()}")
    if not isinstance(addr, str):  # the clients' socket is made in the node's namespace
        with netns.entered(cfg.netns if cfg.netns and netns.exists(cfg.netns) else None):
            return Endpoint(addr, ClusterKey.load_or_create(nodeconf.cluster_key_path()), "nfactorctl")
    return Endpoint(addr, ClusterKey.load_or_create(nodeconf.cluster_key_path()), "nfactorctl")


def runtime_node(name: str, rt_id: int) -> str:
    """Whose run directory holds runtime rt_id's query socket: with hosts, a
    worker host's (reachable when it runs on this machine, as in the testbed)."""
    state = nodeconf.read_state(name) or {}
    if (state.get("config") or {}).get("hosts"):
        host = fabric.host_of(rt_id)
        if host:
            return fabric.worker_name(name, host)
    return name


def control_call(name: str, to: str, msg_type, body: dict, timeout: float = 1.0) -> dict:
    """A request to the node's controller, supervisor or switch agent (to:
    'control', 'supervisor' or 'switch')."""
    state = nodeconf.read_state(name)
    if state is None:
        raise not_up(name)
    if to == "supervisor" and not is_same(state.get("supervisor")):
        raise NodeCtlError(f"node {name!r} is not running: its supervisor is gone (`nfactorctl down --name {name}` "
                           f"cleans up what it left, then `nfactorctl up`)")
    cfg = NodeConfig.from_dict(state.get("config") or {"name": name})
    ep = _endpoint(cfg)
    try:
        if to == "control":
            addr = nodeconf.controller_addresses(cfg)
        elif to == "supervisor" and cfg.hosts and isinstance(body.get("id"), int):
            # a runtime's own host's supervisor: it is the one that runs it
            addr = nodeconf.control_address(cfg, "supervisor", host=fabric.host_of(body["id"]))
        else:
            addr = nodeconf.control_address(cfg, ROLES[to])
        reply = ep.call(addr, msg_type, body, timeout=timeout, retries=3)
    except MessageTimeout as e:
        raise NodeCtlError(f"node {name!r}: the {ROLES[to]} does not answer: {e}; `nfactorctl status --name {name}` "
                           f"shows the node, {nodeconf.log_dir(name)}/ has its logs") from None
    finally:
        ep.close()
    if reply.body.get("ok") is False:
        raise NodeCtlError(reply.body.get("error", "refused"))
    return reply.body


def runtime_query(name: str, rt_id: int, op: str, timeout: float = 0.5, **args) -> dict | None:
    try:
        return query.request(nodeconf.runtime_socket(runtime_node(name, rt_id), rt_id), op, timeout=timeout,
                             **args)
    except query.QueryError:
        return None


def _controller_status(name: str) -> dict | None:
    try:
        return control_call(name, "control", MsgType.STATUS, {}, timeout=0.3)
    except NodeCtlError:
        return None


def status(name: str, timeout: float = 0.5) -> dict:
    """The node as `status --json` shows it (the metrics endpoint too).  The
    controller and every runtime are asked at once: one that does not answer
    (within `timeout`; the controller within its retries) is shown as not
    live, and never holds up the others."""
    state = nodeconf.read_state(name)
    if state is None:
        raise not_up(name)
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
                                                               "last_exit")}
             for role in ("controller", "switch_agent", "metrics")}
    out["switch_agent"] = procs["switch_agent"]
    if state.get("metrics"):  # the metrics endpoint's process, when the node has one
        out["metrics"] = procs["metrics"]
    rts = state.get("runtimes", [])
    with ThreadPoolExecutor(max_workers=1 + len(rts)) as pool:
        asked = pool.submit(_controller_status, name)
        lives = [pool.submit(runtime_query, name, rt["id"], "status", timeout) for rt in rts]
    ctl = asked.result()
    if ctl is not None:
        view = {e["id"]: e for e in ctl["view"]["runtimes"]}
        out["controller"] = {"pid": ctl.get("pid"), "alive": True, "view_version": ctl["view"]["version"],
                             "stats": ctl.get("stats"), "rejected": ctl.get("rejected"), "log": ctl.get("log"),
                             "rules": len(ctl.get("policy", {}).get("rules", [])), **procs["controller"]}
    else:
        view = {}
        out["controller"] = {"alive": False, **procs["controller"]}
    # with hosts: the other hosts' runtimes, as the view has them
    remote = [_remote_runtime(name, i, e) for i, e in sorted(view.items()) if i not in {r["id"] for r in rts}]
    if remote:
        with ThreadPoolExecutor(max_workers=len(remote)) as pool:
            lives += [pool.submit(runtime_query, name, rt["id"], "status", timeout) for rt in remote]
        rts = rts + remote
    for rt, live in zip(rts, lives):
        entry = dict(rt)
        v = view.get(rt["id"], {})
        entry["state"] = v.get("state", "unknown")
        entry["host"] = v.get("host", entry.get("host", 0))
        entry["load"] = v.get("load", {})
        entry["switch_state"] = table.get(rt["id"], {}).get("state", "none")
        entry["switch"] = table.get(rt["id"], {}).get("switch", {})
        live = live.result()
        entry["live"] = live is not None
        if live:
            for k in ("pid", "recovering", "flows", "frames", "forwarded", "sent_later", "held", "markers",
                      "dropped", "dropped_by_chain", "dropped_not_flow", "flows_created", "flows_expired",
                      "flows_evicted", "switch_entries_deleted", "switch_entries_asked",
                      "idle_waits", "xsk", "uptime", "replication", "migration", "limits", "control_errors",
                      "fragments", "offload", "takeover"):
                entry[k] = live.get(k)
        out["runtimes"].append(entry)
    return out


def _remote_runtime(name: str, rt_id: int, entry: dict) -> dict:
    """Another host's runtime as its supervisor records it when that host's
    state is on this machine (the testbed), else as the view has it."""
    host = entry.get("host") or fabric.host_of(rt_id)
    record = next((r for r in (nodeconf.read_state(fabric.worker_name(name, host)) or {}).get("runtimes", [])
                   if r.get("id") == rt_id), None)
    return {**(record or {"id": rt_id, "pid": entry.get("pid"), "core": entry.get("core"), "process": "remote"}),
            "host": host}


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
        raise not_up(name)
    with NodeMaps(name) as maps:
        placed = {f["key"]: f for f in maps.flows()}
    actors = {}
    ids = {rt["id"] for rt in state.get("runtimes", [])}
    hosts = bool((state.get("config") or {}).get("hosts"))
    if hosts:  # and the other hosts' runtimes
        ctl = _controller_status(name)
        ids |= {e["id"] for e in (ctl or {}).get("view", {}).get("runtimes", [])}
    for rt_id in sorted(ids):
        for a in runtime_flows(name, rt_id, limit=limit) or []:
            actors[a["key"]] = dict(a, runtime=rt_id)
    out = []
    for key in sorted(set(placed) | set(actors)):
        p, a = placed.get(key), actors.get(key)
        entry = {
            "key": key, "flow": flowkey.describe(bytes.fromhex(key)),
            "switch_runtime": p["runtime"] if p else None,
            "switch_offload": p.get("offload", 0) if p else 0,  # the switch entry's offloads slot + 1 (0: none)
            "runtime": a["runtime"] if a else None,
            "packets": a["packets"] if a else None, "bytes": a["bytes"] if a else None,
        }
        if hosts:  # the host of the runtime that has it (or of the one its entry names)
            owner = a["runtime"] if a else (p["runtime"] if p else None)
            entry["host"] = fabric.host_of(owner) if owner is not None else None
        if a:
            for k in ("chain", "rule", "dropped", "closed", "nfs", "nf_errors", "errors", "replica",
                      "snapshot_version", "migrating", "migratable", "state_bytes", "offload", "offload_reason",
                      "observed_copies"):
                if k in a:
                    entry[k] = a[k]
        out.append(entry)
        if limit and len(out) >= limit:
            break
    return {"node": name, "flows": out}


def migrate(name: str, src: int, dst: int, *, count: int | None = None, keys: list[str] | None = None,
            timeout: float = 120.0, progress=None) -> dict:
    """Migrate flows of runtime `src` to `dst` (all, `count` of them, or the
    given keys) and wait until every migration has finished; `progress` is
    called with the batch's report each time it is polled."""
    if nodeconf.read_state(name) is None:
        raise not_up(name)
    args = {"to": dst}
    if keys:
        args["keys"] = keys
    elif count is not None:
        args["count"] = count
    def ask(op: str, **kw) -> dict:
        try:
            return query.request(nodeconf.runtime_socket(runtime_node(name, src), src), op, **kw)
        except query.QueryError as e:
            raise NodeCtlError(f"runtime {src}: {e} (`nfactorctl status --name {name}` shows whether it "
                               f"runs)") from None

    started = ask("migrate", timeout=5.0, **args)
    deadline = time.monotonic() + timeout
    report = started
    while not report.get("done"):
        if progress:
            progress(report)
        if time.monotonic() > deadline:
            raise NodeCtlError(f"migrations from runtime {src} not finished after {timeout}s: "
                               f"{report.get('succeeded')} migrated, {report.get('failed')} failed, "
                               f"{report.get('in_progress')} in progress of {report.get('total')} flows")
        time.sleep(0.01)  # polling the source runtime with a deadline
        report = ask("migrate_status", batch=started["batch"])
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

