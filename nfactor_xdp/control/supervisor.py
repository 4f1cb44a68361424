"""The node agent: brings a node up on two external ports, keeps its
runtimes running, and takes everything down again.

    up:   load the XDP programs (maps pinned, reused if present), create one
          veth pair per runtime, fill the port/devmap/runtime maps, attach,
          start one runtime process per core and mark it running once its
          AF_XDP socket is registered.
    run:  restart a runtime that dies (it is marked failed meanwhile: its
          flows stay placed on it and are dropped, counted, at its port).
    down: stop the runtimes, detach every program, delete the runtime ports,
          unpin the maps, remove the run directory.  Nothing is left behind.

The agent process holds no state the node needs to forward: if it is killed,
the programs stay attached and the runtimes keep forwarding; `down` cleans up
after it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from pyroute2 import IPRoute

from ..kern import layouts as L
from ..kern import netns
from ..formats import config as nodeconf, query as rtctl
from ..kern.loader import LoaderError, Programs, detach, remove_pins
from ..kern.maps import NodeMaps
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from ..formats.config import ConfigError, NodeConfig
from ..dataplane.rules import RuleError, load_policy, save_policy
from ..errors import NFactorError

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
RESTART_BACKOFF = 0.1  # seconds before a dead runtime is started again


class NodeError(NFactorError):
    pass


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _set_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def _ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RuntimeProc:
    """The supervisor's record of a runtime process (the controller keeps the view)."""

    def __init__(self, rt_id: int, core: int, sw: str, port: str):
        self.id, self.core, self.sw, self.port = rt_id, core, sw, port
        self.proc: subprocess.Popen | None = None
        self.state = "starting"   # process: starting, running, exited
        self.restarts = 0
        self.started_at = 0.0
        self.failed_at = 0.0

    def info(self) -> dict:
        return {"id": self.id, "core": self.core, "port": self.port, "switch_port": self.sw,
                "pid": self.proc.pid if self.proc else None, "state": self.state,
                "restarts": self.restarts}


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg.validate()
        self.progs = Programs(cfg.name, flow_table_size=cfg.flow_table_size)
        self.maps = NodeMaps(cfg.name)
        self.runtimes: list[RuntimeProc] = []
        self.stopping = False
        self.attached: list[str] = []
        self.xdp_modes: dict[str, str] = {}
        self.control_port = free_udp_port()
        self.supervisor_port = free_udp_port()
        self.ep: Endpoint | None = None
        self.controller: subprocess.Popen | None = None
        self.controller_restarts = 0
        self.controller_started = 0.0
        self.switch_port = free_udp_port()
        self.switch_agent: subprocess.Popen | None = None
        self.switch_agent_restarts = 0

    # --- bring up ----------------------------------------------------------
    def up(self) -> None:
        os.makedirs(self.cfg.run_dir, mode=0o700, exist_ok=True)
        self._write_state("starting")
        if self.cfg.policy:
            save_policy(load_policy(self.cfg.policy), nodeconf.policy_path(self.cfg.name))
        self.setup_switch()
        self.ep = Endpoint(("127.0.0.1", self.supervisor_port),
                           ClusterKey.load_or_create(nodeconf.cluster_key_path()), "supervisor")
        self._spawn_controller()
        self._spawn_switch_agent()
        for rt in self.runtimes:
            self._spawn(rt)
        self._wait_ready(self.runtimes)
        self._write_state("running")

    def setup_switch(self) -> None:
        """Programs loaded, ports made, maps filled, programs attached; no
        runtime process yet (all runtimes are `starting`)."""
        cfg = self.cfg
        with IPRoute() as ipr:
            for port in (cfg.ext0, cfg.ext1):
                if _ifindex(ipr, port) is None:
                    where = f"namespace {cfg.netns}" if cfg.netns else "this namespace"
                    raise NodeError(f"interface {port!r} not found in {where}")
        self.progs.load()
        self.maps.write_config(other_action=cfg.other_action, mode=L.C["NFX_MODE_FLOWS"])
        # Pins may come from an earlier run: no runtime takes new flows until
        # it says it is ready, and slots beyond this run's runtimes are emptied
        # (their flows get placed anew).
        self.maps.publish_rr([])
        for rt_id in range(cfg.runtimes, L.C["NFX_MAX_RUNTIMES"]):
            self.maps.set_runtime(rt_id, L.C["NFX_RT_NONE"], 0)
        with IPRoute() as ipr:
            for rt_id in range(cfg.runtimes):
                sw, port = nodeconf.runtime_ports(rt_id)
                self.runtimes.append(RuntimeProc(rt_id, cfg.core_of(rt_id), sw, port))
                self._make_runtime_port(ipr, rt_id, sw, port)
            for slot, role, port in ((L.C["NFX_SLOT_EXT0"], L.C["NFX_PORT_EXT0"], cfg.ext0),
                                     (L.C["NFX_SLOT_EXT1"], L.C["NFX_PORT_EXT1"], cfg.ext1)):
                idx = _ifindex(ipr, port)
                ipr.link("set", index=idx, state="up")
                self.maps.set_slot(slot, idx)
                self.maps.set_port(idx, role)
        # Runtime-side programs first: a veth that receives redirected frames
        # must have XDP (NAPI) before anything is sent to it.
        for rt in self.runtimes:
            self._attach(rt.port, "steer")
            self._attach(rt.sw, "vswitch")
        for port in (self.cfg.ext0, self.cfg.ext1):
            self._attach(port, "vswitch")

    def _make_runtime_port(self, ipr: IPRoute, rt_id: int, sw: str, port: str) -> None:
        if _ifindex(ipr, sw) is None:
            if _ifindex(ipr, port) is not None:
                ipr.link("del", index=_ifindex(ipr, port))
            # One queue each way: the AF_XDP socket is bound to queue 0, and a
            # multi-queue veth would pick the queue by the sending CPU
            # (frames on queue 1 would never reach the socket, and one flow
            # could be processed on two CPUs at once, out of order).
            ipr.link("add", ifname=sw, kind="veth", num_tx_queues=1, num_rx_queues=1,
                     peer={"ifname": port, "num_tx_queues": 1, "num_rx_queues": 1})
        for name in (sw, port):
            # Nothing but the runtime's frames may cross this link.
            _set_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
            ipr.link("set", index=_ifindex(ipr, name), state="up")
        sw_idx, port_idx = _ifindex(ipr, sw), _ifindex(ipr, port)
        self.maps.set_slot(L.C["NFX_SLOT_RT_BASE"] + rt_id, sw_idx)
        self.maps.set_port(sw_idx, L.C["NFX_PORT_RUNTIME"], rt_id)
        self.maps.set_port(port_idx, L.C["NFX_PORT_STEER"], rt_id)
        # Starting: keeps the flows it had (pinned table), takes no new ones.
        self.maps.set_runtime(rt_id, L.C["NFX_RT_STARTING"], sw_idx)

    def add_runtime(self) -> RuntimeProc:
        """A new runtime at run time (scale-out or operator): port, programs, process."""
        used = {rt.id for rt in self.runtimes}
        rt_id = next(i for i in range(L.C["NFX_MAX_RUNTIMES"]) if i not in used)
        sw, port = nodeconf.runtime_ports(rt_id)
        rt = RuntimeProc(rt_id, self.cfg.core_of(rt_id), sw, port)
        with IPRoute() as ipr:
            self._make_runtime_port(ipr, rt_id, sw, port)
        self._attach(port, "steer")
        self._attach(sw, "vswitch")
        self.runtimes.append(rt)
        self._spawn(rt)
        return rt

    def remove_runtime(self, rt: RuntimeProc) -> None:
        """Stop a runtime for good; its flows are placed anew (without
        migration their NF state is lost)."""
        self.runtimes.remove(rt)
        self._notify_controller(MsgType.RUNTIME_STOP, {"id": rt.id})
        if rt.proc:
            stop_processes([rt.proc.pid])
        with IPRoute() as ipr:
            for name in (rt.port, rt.sw):
                if _ifindex(ipr, name) is not None:
                    detach(name)
            idx = _ifindex(ipr, rt.sw)
            if idx is not None:
                ipr.link("del", index=idx)
        self.maps.set_runtime_state(rt.id, L.C["NFX_RT_NONE"])

    def _attach(self, ifname: str, which: str, mode: str | None = None) -> None:
        self.xdp_modes[ifname] = self.progs.attach(ifname, which, mode or self.cfg.xdp_mode)
        self.attached.append(ifname)

    def _spawn(self, rt: RuntimeProc) -> None:
        log = open(nodeconf.log_path(self.cfg.name, f"rt{rt.id}"), "ab")
        argv = [sys.executable, "-m", "nfactor_xdp.dataplane.runtime", "--node", self.cfg.name,
                "--id", str(rt.id), "--ifname", rt.port, "--core", str(rt.core),
                "--idle-timeout", str(self.cfg.idle_timeout), "--batch", str(self.cfg.batch),
                "--policy", nodeconf.policy_path(self.cfg.name),
                "--controller", str(self.control_port), "--heartbeat", str(self.cfg.heartbeat),
                "--switch-agent", str(self.switch_port), "--max-migrations", str(self.cfg.max_migrations),
                "--migrate-threshold", str(self.cfg.migrate_threshold),
                "--snapshot-every", str(self.cfg.snapshot_every)]
        rt.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        rt.state = "starting"
        rt.started_at = time.monotonic()

    def _spawn_controller(self) -> None:
        cfg = self.cfg
        log = open(nodeconf.log_path(cfg.name, "controller"), "ab")
        conf = {"heartbeat": cfg.heartbeat, "miss_limit": cfg.miss_limit, "scale_threshold": cfg.scale_threshold,
                "scale_window": cfg.scale_window, "max_runtimes": cfg.max_runtimes,
                "scale_in_threshold": cfg.scale_in_threshold, "min_runtimes": cfg.min_runtimes}
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "nfactor_xdp.control.controller", "--node", cfg.name, "--port", str(self.control_port),
             "--supervisor", str(self.supervisor_port), "--config-json", json.dumps(conf)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.controller_started = time.monotonic()

    def _spawn_switch_agent(self) -> None:
        log = open(nodeconf.log_path(self.cfg.name, "switchagent"), "ab")
        self.switch_agent = subprocess.Popen(
            [sys.executable, "-m", "nfactor_xdp.control.switch_agent", "--node", self.cfg.name, "--port", str(self.switch_port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _notify_controller(self, msg_type, body: dict) -> None:
        if self.ep:
            self.ep.send(("127.0.0.1", self.control_port), msg_type, body)

    def _ready(self, rt: RuntimeProc) -> bool:
        """Running: its socket is registered and the controller has it in the view."""
        try:
            return bool(rtctl.request(nodeconf.runtime_socket(self.cfg.name, rt.id), "ping",
                                      timeout=0.5).get("registered"))
        except rtctl.RtctlError:
            return False

    def _wait_ready(self, rts: list[RuntimeProc]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = list(rts)
        while waiting:
            for rt in list(waiting):
                if rt.proc.poll() is not None:
                    raise NodeError(f"runtime {rt.id} exited with {rt.proc.returncode} while starting; "
                                    f"see {nodeconf.log_path(self.cfg.name, f'rt{rt.id}')}")
                if self._ready(rt):
                    rt.state = "running"
                    waiting.remove(rt)
            if waiting:
                if time.monotonic() > deadline:
                    raise NodeError(f"runtimes {[r.id for r in waiting]} not ready after {READY_TIMEOUT}s")
                time.sleep(0.05)  # polling interval while waiting for a deadline

    # --- keep running ------------------------------------------------------
    def supervise(self) -> None:
        """The paper's guard: restart the controller and any runtime that
        dies, serve operator requests, until asked to stop."""
        while not self.stopping:
            changed = self._reap()
            for msg, addr in self.ep.receive(32):
                changed |= self.on_request(msg, addr)
            if changed:
                self._write_state("running")
            sig = signal.sigtimedwait([signal.SIGTERM, signal.SIGINT, signal.SIGCHLD], 0.02)
            if sig is not None and sig.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True

    def _reap(self) -> bool:
        changed = False
        now = time.monotonic()
        if self.controller.poll() is not None and now - self.controller_started >= RESTART_BACKOFF / 5:
            self.controller_restarts += 1
            self._spawn_controller()
            changed = True
        if self.switch_agent.poll() is not None:
            self.switch_agent_restarts += 1
            self._spawn_switch_agent()
            changed = True
        for rt in self.runtimes:
            if rt.proc.poll() is None:
                if rt.state == "starting" and self._ready(rt):
                    rt.state = "running"
                    changed = True
                continue
            if rt.state != "exited":
                # the controller marks it failed in the view and the switch at once
                rt.state = "exited"
                rt.failed_at = now
                self._notify_controller(MsgType.RUNTIME_EXITED, {"id": rt.id, "code": rt.proc.returncode})
                changed = True
            if now - rt.failed_at >= RESTART_BACKOFF:
                rt.restarts += 1
                self._spawn(rt)
                changed = True
        return changed

    def on_request(self, msg: Message, addr) -> bool:
        """Operator and controller requests; bad ones get an error reply."""
        body = msg.body if isinstance(msg.body, dict) else {}
        rt = next((r for r in self.runtimes if r.id == body.get("id")), None)
        try:
            if msg.type == MsgType.RUNTIME_ADD:
                if len(self.runtimes) >= L.C["NFX_MAX_RUNTIMES"]:
                    raise NodeError("no free runtime slot")
                new = self.add_runtime()
                self.ep.send(addr, MsgType.REPLY, {"ok": True, "id": new.id}, rid=msg.rid)
                return True
            if msg.type in (MsgType.RUNTIME_STOP, MsgType.RUNTIME_KILL):
                if rt is None:
                    raise NodeError(f"no runtime {body.get('id')!r}")
                if msg.type == MsgType.RUNTIME_KILL:
                    os.kill(rt.proc.pid, signal.SIGKILL)  # failure injection: the guard restarts it
                else:
                    self.remove_runtime(rt)
                self.ep.send(addr, MsgType.REPLY, {"ok": True, "id": rt.id}, rid=msg.rid)
                return True
            if msg.type == MsgType.STATUS:
                self.ep.send(addr, MsgType.REPLY, {"ok": True, "runtimes": [r.info() for r in self.runtimes]},
                             rid=msg.rid)
                return False
        except (NodeError, OSError) as e:
            self.ep.send(addr, MsgType.REPLY, {"ok": False, "error": str(e)}, rid=msg.rid)
        return False

    # --- take down -----------------------------------------------------------
    def down(self) -> None:
        self._write_state("stopping")
        stop_processes([rt.proc.pid for rt in self.runtimes if rt.proc])
        if self.controller:
            stop_processes([self.controller.pid])
        if self.switch_agent:
            stop_processes([self.switch_agent.pid])
        for rt in self.runtimes:
            try:
                self.maps.set_runtime_state(rt.id, L.C["NFX_RT_NONE"])
            except OSError:
                pass
        if self.ep:
            self.ep.close()
        self.maps.close()
        self.progs.close()
        teardown(self.cfg)

    def _write_state(self, phase: str) -> None:
        nodeconf.write_state(self.cfg.name, {
            "phase": phase, "agent_pid": os.getpid(), "config": self.cfg.to_dict(),
            "runtimes": [rt.info() for rt in self.runtimes],
            "xdp_modes": self.xdp_modes, "tracer": self.progs.tracing,
            "control_port": self.control_port, "supervisor_port": self.supervisor_port,
            "controller": {"pid": self.controller.pid if self.controller else None,
                           "restarts": self.controller_restarts},
            "switch_port": self.switch_port,
            "switch_agent": {"pid": self.switch_agent.pid if self.switch_agent else None,
                             "restarts": self.switch_agent_restarts},
            "updated": time.time(),
        })


def stop_processes(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)  # polling a process's exit with a deadline
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def teardown(cfg: NodeConfig) -> list[str]:
    """Remove what a node put on the system; safe to run more than once and
    after a crash.  Runs in the ports' namespace."""
    done = []
    with netns.entered(cfg.netns if cfg.netns and netns.exists(cfg.netns) else None):
        with IPRoute() as ipr:
            names = [cfg.ext0, cfg.ext1]
            for rt_id in range(L.C["NFX_MAX_RUNTIMES"]):
                names += list(nodeconf.runtime_ports(rt_id))
            for name in names:
                if _ifindex(ipr, name) is not None:
                    detach(name)
            for rt_id in range(L.C["NFX_MAX_RUNTIMES"]):
                sw, _ = nodeconf.runtime_ports(rt_id)
                idx = _ifindex(ipr, sw)
                if idx is not None:
                    ipr.link("del", index=idx)
                    done.append(f"link {sw}")
    done += [f"pin {p}" for p in remove_pins(cfg.name)]
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(nodeconf.controller_log_path(cfg.name) + suffix)
        except FileNotFoundError:
            pass
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    try:
        os.rmdir(nodeconf.RUN_ROOT)
    except OSError:
        pass
    return done


def force_down(name: str) -> list[str]:
    """`down` when the agent is gone: stop what it left running, then teardown."""
    state = nodeconf.read_state(name) or {}
    cfg = NodeConfig.from_dict(state.get("config", {"name": name}))
    pids = [r["pid"] for r in state.get("runtimes", []) if r.get("pid") and _pid_alive(r["pid"])]
    for service in ("controller", "switch_agent"):
        pid = (state.get(service) or {}).get("pid")
        if pid and _pid_alive(pid):
            pids.append(pid)
    stop_processes(pids)
    return teardown(cfg)


def run_foreground(cfg: NodeConfig) -> int:
    """The agent's main: up, supervise until SIGTERM/SIGINT, down."""
    if os.geteuid() != 0:
        raise NodeError("the node needs root (XDP, bpffs, veths)")
    if cfg.netns:
        netns.enter(cfg.netns)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD])
    node = Node(cfg)
    try:
        node.up()
        print(f"node {cfg.name}: running, {cfg.runtimes} runtimes", flush=True)
        node.supervise()
        return 0
    finally:
        node.down()
        print(f"node {cfg.name}: down", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nfactor-node")
    ap.add_argument("--config-json", required=True)
    a = ap.parse_args(argv)
    try:
        cfg = NodeConfig.from_dict(json.loads(a.config_json))
        return run_foreground(cfg)
    except (NodeError, LoaderError, ConfigError, RuleError, OSError) as e:
        print(f"node: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
