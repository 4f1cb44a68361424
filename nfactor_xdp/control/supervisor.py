"""The supervisor (the paper's guard): brings a node up on two external
ports, keeps its processes running, and takes everything down again.

    up:   load the XDP programs (maps pinned, reused if present), create one
          veth pair per runtime, fill the port/devmap/runtime maps, attach,
          start the controller, the switch agent and one runtime per core;
          up once every runtime has registered with the controller.
    run:  restart whatever dies: a runtime (the controller marks it failed
          meanwhile: its flows stay placed on it), the controller, the switch
          agent; serve the operator's runtime add/stop/kill.
    down: stop every process, detach the node's programs (by id: another
          tool's stay, coexist.py), delete the runtime ports, unpin the
          maps, remove the run directory.  Nothing of the node is left.

The supervisor holds no state the node needs to forward: if it is killed,
the programs stay attached and the runtimes keep forwarding; `down` cleans up
after it and `up` starts a new one on the same pins, which takes the live
runtimes over (adoption.py); SIGHUP makes it do so in this process.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time

from pyroute2 import IPRoute

from .. import logs
from ..dataplane.rules import RuleError, load_policy, save_policy
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats import query
from ..formats.config import NodeConfig, process_args
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from ..kern import layouts as L
from ..kern import netns
from ..kern.loader import Programs, detach, remove_pins
from ..kern.maps import NodeMaps
from .coexist import may_replace, owned_prog_ids, refuse_taken_ports, release
from . import adoption
from .processes import RESTART_BACKOFF, Child, RuntimeProc, identity, signal_process, stop_processes
from .sd_notify import Notifier

READY_TIMEOUT = 20.0
CONTROLLER_BACKOFF = RESTART_BACKOFF / 5
_POLL = 0.05  # polling interval while waiting for runtimes, always with a deadline

log = logs.get("supervisor")


class NodeError(NFactorError):
    pass


def _set_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def fabric_neighbour(ipr: IPRoute, ifindex: int, ip: str) -> str | None:
    """Another host's MAC from the neighbour table; if it is not there, a
    datagram to its discard port makes the kernel resolve it (None meanwhile)."""
    for n in ipr.get_neighbours(ifindex=ifindex, dst=ip):
        mac = n.get_attr("NDA_LLADDR")
        if mac and n["state"] not in (0x01, 0x20):  # not INCOMPLETE, not FAILED
            return mac
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"", (ip, 9))
    except OSError:
        pass
    return None


def _ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


class Node:
    def __init__(self, cfg: NodeConfig):
        # every process finds the others' control sockets from the node's name
        cfg.validate()
        self.cfg = cfg
        self.progs = Programs(cfg.name, flow_table_size=cfg.flow_table_size)
        self.maps = NodeMaps(cfg.name)
        self.runtimes: list[RuntimeProc] = []
        self.stopping = self.reexec = False  # reexec: SIGHUP, become the installed code's supervisor
        self.found, self.adoption = None, None  # runtimes a previous supervisor left (adoption.py); what was done
        self.attached: list[str] = []
        # programs this node may replace or detach: a previous run's too (read before the state is rewritten)
        self.ours = owned_prog_ids(cfg.name)
        self.xdp_progs: dict[str, int] = {}
        self.xdp_modes: dict[str, str] = {}
        self.ep: Endpoint | None = None
        # a worker host (docs/architecture.md, Hosts) runs runtimes only; the ingress host the rest
        self.worker = cfg.host_id != 0
        self.hosts_known: set[int] = set()
        # (with hosts, a worker host may run one too: --controller-hosts)
        self.controller = None if cfg.host_id not in cfg.controller_host_ids else \
            Child(cfg, "controller", "nfactor_xdp.control.controller", backoff=CONTROLLER_BACKOFF)
        # --controllers N with --store etcd: the others wait in etcd to take over from the leader
        self.standbys = [] if self.worker else \
            [Child(cfg, f"controller-{i}", "nfactor_xdp.control.controller", "--role",
                   f"controller-{i}", backoff=CONTROLLER_BACKOFF) for i in range(2, cfg.controllers + 1)]
        self.switch_agent = None if self.worker else \
            Child(cfg, "switch-agent", "nfactor_xdp.control.switch_agent", backoff=RESTART_BACKOFF)
        # the Prometheus endpoint, its own process: a scrape's waits never delay this loop
        self.metrics = Child(cfg, "metrics", "nfactor_xdp.control.metrics", backoff=RESTART_BACKOFF) \
            if cfg.metrics_port and not self.worker else None

    # --- bring up ----------------------------------------------------------
    def up(self) -> None:
        os.makedirs(self.cfg.run_dir, mode=0o700, exist_ok=True)
        self.found = adoption.leftovers(self.cfg)  # read before the state is rewritten
        if not self.found:
            self._write_state("starting")
        check_policy(self.cfg)
        if self.cfg.policy:
            save_policy(load_policy(self.cfg.policy), nodeconf.policy_path(self.cfg.name))
        self.setup_switch()
        self.ep = Endpoint(nodeconf.control_address(self.cfg, "supervisor"),
                           ClusterKey.load_or_create(nodeconf.cluster_key_path()), "supervisor")
        adoption.replace_children(self)
        for child in filter(None, (self.controller, *self.standbys, self.switch_agent, self.metrics)):
            child.spawn()
        for rt in self.runtimes:
            if not rt.adopted:
                rt.spawn()
        self._write_state("adopting" if self.found else "starting")  # every process it runs, recorded
        self._wait_ready(self.runtimes)
        self._write_state("running")

    def setup_switch(self) -> None:
        """Programs loaded, ports made, maps filled, programs attached; no
        runtime process yet (all runtimes are `starting`).  When adopting,
        the runtimes are the recorded ones, and the live ones keep their
        ports and their state in the switch as they are."""
        cfg = self.cfg
        ext_ports = () if self.worker else (cfg.ext0, cfg.ext1)
        fabric_port = cfg.fabric_port if cfg.hosts else None
        with IPRoute() as ipr:
            for port in (*ext_ports, *filter(None, [fabric_port])):
                if _ifindex(ipr, port) is None:
                    where = f"namespace {cfg.netns}" if cfg.netns else "this namespace"
                    raise NodeError(f"interface {port!r} not found in {where}")
        refuse_taken_ports(cfg, self.ours)  # before anything changes
        self.progs.load()
        self.maps.write_config(other_action=cfg.other_action, mode=L.C["NFX_MODE_FLOWS"], host_id=cfg.host_id)
        # Pins may come from an earlier run: no runtime takes new flows until
        # it says it is ready, and slots beyond this run's runtimes are emptied
        # (their flows get placed anew).
        found = self.found.runtimes if self.found else None
        ids = sorted(found) if found else cfg.runtime_ids
        if not found:
            self.maps.publish_rr([])
        # (with hosts, the other hosts' runtimes are the controller's to set)
        for rt_id in set(self.local_ids()) - set(ids):
            self.maps.set_runtime(rt_id, L.C["NFX_RT_NONE"], 0)
        with IPRoute() as ipr:
            for rt_id in ids:
                rt = RuntimeProc(cfg, rt_id)
                self.runtimes.append(rt)
                live = bool(found) and adoption.take_over(self, rt, found[rt_id], ipr)
                self._make_runtime_port(ipr, rt_id, rt.sw, rt.port, keep_state=live)
            ports = [(L.C["NFX_SLOT_EXT0"], L.C["NFX_PORT_EXT0"], cfg.ext0),
                     (L.C["NFX_SLOT_EXT1"], L.C["NFX_PORT_EXT1"], cfg.ext1)][:len(ext_ports)]
            if fabric_port:
                ports.append((L.C["NFX_SLOT_FABRIC"], L.C["NFX_PORT_FABRIC"], fabric_port))
            for slot, role, port in ports:
                idx = _ifindex(ipr, port)
                ipr.link("set", index=idx, state="up")
                self.maps.set_slot(slot, idx)
                self.maps.set_port(idx, role)
        if fabric_port:
            self.publish_hosts()
        # Runtime-side programs first: a veth that receives redirected frames
        # must have XDP (NAPI) before anything is sent to it.
        for rt in self.runtimes:
            self._attach(rt.port, "steer")
            self._attach(rt.sw, "vswitch")
        for port in (*ext_ports, *filter(None, [fabric_port])):
            self._attach(port, "vswitch")

    def local_ids(self) -> range:
        """The runtime ids this host's supervisor may use."""
        base = self.cfg.host_id * self.cfg.max_local_runtimes
        return range(base, base + self.cfg.max_local_runtimes)

    def publish_hosts(self) -> None:
        """The fabric addresses this host's switch needs (the ingress: every
        host's; a worker: its own and the ingress's), each known once its MAC
        is: this host's from its fabric port, the others' from the
        neighbour table (asked for again on each call until known)."""
        cfg = self.cfg
        addrs = cfg.host_addresses
        wanted = range(len(addrs)) if not self.worker else (0, cfg.host_id)
        if self.hosts_known.issuperset(wanted):
            return
        with IPRoute() as ipr:
            idx = _ifindex(ipr, cfg.fabric_port)
            for h in wanted:
                if h in self.hosts_known:
                    continue
                if h == cfg.host_id:
                    mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
                else:
                    mac = fabric_neighbour(ipr, idx, addrs[h])
                self.maps.set_host(h, addrs[h], mac)
                if mac:
                    self.hosts_known.add(h)

    def _make_runtime_port(self, ipr: IPRoute, rt_id: int, sw: str, port: str, keep_state: bool = False) -> None:
        if _ifindex(ipr, sw) is None:
            if _ifindex(ipr, port) is not None:
                ipr.link("del", index=_ifindex(ipr, port))
            # One queue each way: the AF_XDP socket is bound to queue 0, and a
            # multi-queue veth would pick the queue by the sending CPU
            # (frames on queue 1 would never reach the socket, and one flow
            # could be processed on two CPUs at once, out of order).
            ipr.link("add", ifname=sw, kind="veth", num_tx_queues=1, num_rx_queues=1,
                     peer={"ifname": port, "num_tx_queues": 1, "num_rx_queues": 1})
        # Frames to a runtime carry the switch's ingress tag: one byte more
        # than the largest frame the external ports take (redirects check it);
        # on a worker host, what the fabric carries inside its encapsulation.
        if self.worker:
            mtu = ipr.get_links(_ifindex(ipr, self.cfg.fabric_port))[0].get_attr("IFLA_MTU") \
                - L.C["NFX_FABRIC_ENCAP_LEN"] + L.C["NFX_INGRESS_TAG_LEN"]
        else:
            mtu = max(ipr.get_links(_ifindex(ipr, ext))[0].get_attr("IFLA_MTU")
                      for ext in (self.cfg.ext0, self.cfg.ext1)) + L.C["NFX_INGRESS_TAG_LEN"]
        for name in (sw, port):
            # Nothing but the runtime's frames may cross this link.
            _set_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
            ipr.link("set", index=_ifindex(ipr, name), state="up", mtu=mtu)
        sw_idx, port_idx = _ifindex(ipr, sw), _ifindex(ipr, port)
        self.maps.set_slot(L.C["NFX_SLOT_RT_BASE"] + rt_id, sw_idx)
        self.maps.set_port(sw_idx, L.C["NFX_PORT_RUNTIME"], rt_id)
        self.maps.set_port(port_idx, L.C["NFX_PORT_STEER"], rt_id)
        if not keep_state:  # (an adopted runtime's state is the view's, as it was)
            # Starting: keeps the flows it had (pinned table), takes no new ones.
            self.maps.set_runtime(rt_id, L.C["NFX_RT_STARTING"], sw_idx, host=self.cfg.host_id)

    def add_runtime(self) -> RuntimeProc:
        """A new runtime at run time (scale-out or operator): port, programs, process."""
        used = {rt.id for rt in self.runtimes}
        rt_id = next(i for i in self.local_ids() if i not in used)
        rt = RuntimeProc(self.cfg, rt_id)
        with IPRoute() as ipr:
            self._make_runtime_port(ipr, rt_id, rt.sw, rt.port)
        self._attach(rt.port, "steer")
        self._attach(rt.sw, "vswitch")
        self.runtimes.append(rt)
        rt.spawn()
        return rt

    def remove_runtime(self, rt: RuntimeProc) -> None:
        """Stop a runtime for good; its flows are placed anew (without
        migration their NF state is lost)."""
        self.runtimes.remove(rt)
        self._notify_controller(MsgType.RUNTIME_STOP, {"id": rt.id})
        rt.stop()
        with IPRoute() as ipr:
            for name in (rt.port, rt.sw):
                if _ifindex(ipr, name) is not None:
                    detach(name)
            idx = _ifindex(ipr, rt.sw)
            if idx is not None:
                ipr.link("del", index=idx)
        self.maps.set_runtime_state(rt.id, L.C["NFX_RT_NONE"])

    def _attach(self, ifname: str, which: str, mode: str | None = None) -> None:
        self.xdp_modes[ifname] = self.progs.attach(ifname, which, mode or self.cfg.xdp_mode,
                                                   may_replace(self.cfg, self.ours))
        self.xdp_progs[ifname] = self.progs.prog_id(which)
        self.ours.add(self.xdp_progs[ifname])
        self.attached.append(ifname)

    def _notify_controller(self, msg_type, body: dict) -> None:
        if self.ep:
            self.ep.send(nodeconf.controller_addresses(self.cfg), msg_type, body)

    def _ready(self, rt: RuntimeProc) -> bool:
        """Ready: its socket is registered and the controller has it in the view."""
        try:
            return bool(query.request(nodeconf.runtime_socket(self.cfg.name, rt.id), "ping",
                                      timeout=0.5).get("registered"))
        except query.QueryError:
            return False

    def _wait_ready(self, rts: list[RuntimeProc]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = list(rts)
        while waiting:
            for rt in list(waiting):
                if rt.exited():
                    raise NodeError(f"runtime {rt.id} exited with {rt.returncode} while starting; "
                                    f"see {nodeconf.log_path(self.cfg.name, rt.role)}")
                if self._ready(rt):
                    rt.process = "ready"
                    waiting.remove(rt)
            if waiting:
                if time.monotonic() > deadline:
                    raise NodeError(f"runtimes {[r.id for r in waiting]} not ready after {READY_TIMEOUT}s")
                time.sleep(_POLL)

    # --- keep running ------------------------------------------------------
    def supervise(self) -> None:
        """The paper's guard: restart the controller, the switch agent and any
        runtime that dies, serve operator requests, until asked to stop."""
        hosts_due = alive_due = time.monotonic()
        while not self.stopping:
            changed = self._reap()
            now = time.monotonic()
            if self.cfg.hosts and now >= hosts_due:  # a host whose MAC was not known yet
                hosts_due = now + 0.5
                self.publish_hosts()
            if self.worker and now >= alive_due:  # a dead host says nothing: its silence is the sign
                alive_due = now + self.cfg.heartbeat
                self.ep.send(nodeconf.controller_addresses(self.cfg, "heartbeat"), MsgType.HOST_ALIVE,
                             {"host": self.cfg.host_id,
                              "runtimes": {str(rt.id): (rt.identity or {}).get("pid") for rt in self.runtimes}})
            for msg, addr in self.ep.receive(32):
                changed |= self.on_request(msg, addr)
            if changed:
                self._write_state("running")
            sig = signal.sigtimedwait([signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP], 0.02)
            if sig is not None and sig.si_signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.stopping, self.reexec = True, sig.si_signo == signal.SIGHUP

    def _reap(self) -> bool:
        changed = False
        now = time.monotonic()
        for child in filter(None, (self.controller, *self.standbys, self.switch_agent, self.metrics)):
            if child.exited():
                if child.exited_at is None:
                    self._exited(child, now)
                    changed = True
                if child.restart_due(now):
                    child.respawn()
                    changed = True
        for rt in self.runtimes:
            if not rt.exited():
                if rt.process == "started" and self._ready(rt):
                    rt.process = "ready"
                    changed = True
                continue
            if rt.process != "exited":
                # the controller marks it failed in the view and the switch at once
                rt.process = "exited"
                self._exited(rt, now)
                self._notify_controller(MsgType.RUNTIME_EXITED, {"id": rt.id, "code": rt.returncode})
                changed = True
            if rt.restart_due(now):
                rt.respawn()
                changed = True
        return changed

    def _exited(self, child: Child, now: float) -> None:
        child.note_exit(now)
        why = child.last_exit["why"]
        log.warning("%s exited with %s%s; restarting it in %.2fs (exit %d in a row soon after its start)",
                    child.role, child.returncode, f": {why}" if why else "", child.delay, child.quick_exits)

    def on_request(self, msg: Message, addr) -> bool:
        """Operator and controller requests; bad ones get an error reply."""
        body = msg.body if isinstance(msg.body, dict) else {}
        rt = next((r for r in self.runtimes if r.id == body.get("id")), None)
        try:
            if msg.type == MsgType.RUNTIME_ADD:
                if len(self.runtimes) >= self.cfg.max_local_runtimes:
                    raise NodeError("no free runtime slot")
                new = self.add_runtime()
                self.ep.reply(msg, addr, {"ok": True, "id": new.id})
                return True
            if msg.type in (MsgType.RUNTIME_STOP, MsgType.RUNTIME_KILL):
                if rt is None:
                    raise NodeError(f"no runtime {body.get('id')!r}")
                if msg.type == MsgType.RUNTIME_KILL:
                    # failure injection, or the controller's hang watchdog (naming the pid it saw hung:
                    # a process started since is left alone); the guard restarts it
                    pid = body.get("pid")
                    if pid is not None and (rt.identity or {}).get("pid") != pid:
                        raise NodeError(f"runtime {rt.id} is no longer pid {pid}")
                    if body.get("why"):
                        log.warning("killing runtime %d (pid %s): %s", rt.id, pid, body["why"])
                    signal_process(rt.identity, signal.SIGKILL)
                elif body.get("restart"):  # drained for a rolling restart: a fresh process, same port
                    adoption.replace(rt, body.get("pid"))
                else:
                    self.remove_runtime(rt)
                self.ep.reply(msg, addr, {"ok": True, "id": rt.id})
                return True
            if msg.type == MsgType.STATUS:
                self.ep.reply(msg, addr, {"ok": True, "runtimes": [r.info() for r in self.runtimes]})
                return False
            if msg.type == MsgType.HOST_FENCED and self.worker:
                # this host was taken for dead and its runtimes' flows taken over: these must not go on
                for stale in body.get("kill") or []:
                    r = next((r for r in self.runtimes if r.id == stale.get("id")), None)
                    if r is not None and (r.identity or {}).get("pid") == stale.get("pid"):
                        log.warning("host fenced by the controller: killing runtime %d (pid %s)", r.id, stale["pid"])
                        signal_process(r.identity, signal.SIGKILL)
                return False
        except (NodeError, OSError) as e:
            self.ep.reply(msg, addr, {"ok": False, "error": str(e)})
        return False

    # --- take down -----------------------------------------------------------
    def down(self) -> None:
        self._write_state("stopping")
        stop_processes([rt.identity for rt in self.runtimes])
        # standbys first: none may take the lead the leader gives up
        for child in filter(None, (*self.standbys, self.controller, self.switch_agent, self.metrics)):
            child.stop()
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
            "phase": phase, "supervisor_pid": os.getpid(), "supervisor": identity(os.getpid()),
            "config": self.cfg.to_dict(),
            "runtimes": [rt.info() for rt in self.runtimes],
            "xdp_modes": self.xdp_modes, "tracer": self.progs.tracing,
            "xdp_progs": self.xdp_progs, "xdp_owned": sorted(self.ours),
            "controller": self.controller.info() if self.controller else None,
            "switch_agent": self.switch_agent.info() if self.switch_agent else None,
            **{s.role.replace("-", "_"): s.info() for s in self.standbys},
            "metrics": self.metrics.info() if self.metrics else None,
            "adoption": self.adoption, "updated": time.time(),
        })


def teardown(cfg: NodeConfig) -> list[str]:
    """Remove what a node put on the system; safe to run more than once and
    after a crash.  Runs in the ports' namespace."""
    done = []
    with netns.entered(cfg.netns if cfg.netns and netns.exists(cfg.netns) else None):
        names = [] if cfg.host_id else [cfg.ext0, cfg.ext1]
        if cfg.hosts:
            names.append(cfg.fabric_port)
        for rt_id in range(L.C["NFX_MAX_RUNTIMES"]):
            names += list(nodeconf.runtime_ports(rt_id))
        release(names, owned_prog_ids(cfg.name))  # only ours: another tool's program stays
        with IPRoute() as ipr:
            for rt_id in range(L.C["NFX_MAX_RUNTIMES"]):
                sw, _ = nodeconf.runtime_ports(rt_id)
                idx = _ifindex(ipr, sw)
                if idx is not None:
                    ipr.link("del", index=idx)
                    done.append(f"link {sw}")
    done += [f"pin {p}" for p in remove_pins(cfg.name)]
    if cfg.store == "etcd":  # its state there goes too, as the SQLite log below
        from .cluster_store import StoreError, forget
        try:
            forget(cfg.etcd_members, cfg.name)
            done.append(f"etcd keys /nfactor/{cfg.name}/")
        except StoreError as e:
            log.warning("the node's keys in etcd stay: %s", e)
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


def check_policy(cfg: NodeConfig) -> None:
    """Refuse to start a node whose policy cannot be loaded: it would forward
    traffic without its NFs.  Checks --policy if given, else the saved one."""
    path = cfg.policy or nodeconf.policy_path(cfg.name)
    if cfg.policy or os.path.exists(path):
        try:
            load_policy(path)
        except RuleError as e:
            raise NodeError(f"not starting node {cfg.name!r}: {e} (fix the file, or remove it to run "
                            f"with the default policy)") from None


def stop_leftovers(state: dict) -> None:
    """Stop the processes a dead supervisor left, as recorded in its state:
    only those still the very processes recorded (pid and start time)."""
    stop_processes([r.get("identity") for r in state.get("runtimes", [])] + adoption.recorded_children(state))


def force_down(name: str) -> list[str]:
    """`down` when the supervisor is gone: stop what it left running, then teardown."""
    state = nodeconf.read_state(name) or {}
    cfg = NodeConfig.from_dict(state.get("config", {"name": name}))
    stop_leftovers(state)
    return teardown(cfg)


def run_foreground(cfg: NodeConfig) -> int:
    """The supervisor's life: up, supervise until SIGTERM/SIGINT, down
    (in this process: `nfactorctl up --foreground` and systemd run it so)."""
    if os.geteuid() != 0:
        raise NodeError("the node needs root (XDP, bpffs, veths)")
    logs.setup("supervisor", **cfg.log_options("supervisor"))
    systemd = Notifier()  # before setns: an abstract NOTIFY_SOCKET is this namespace's
    if cfg.netns:
        netns.enter(cfg.netns)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP])
    node = Node(cfg)
    try:
        node.up()
    except BaseException as e:
        if node.found or isinstance(e, adoption.AdoptionError):
            # an adoption that failed, or refused: the runtimes go on forwarding, nothing is torn down
            adoption.let_go(node, stop_children=True)
            raise
        systemd.notify("STOPPING=1")
        node.down()
        raise
    try:
        log.info("node %s running, %d runtimes", cfg.name, cfg.runtimes)
        systemd.notify("READY=1", f"STATUS=node {cfg.name} running, {cfg.runtimes} runtimes")
        node.supervise()
    finally:
        if not node.reexec:
            systemd.notify("STOPPING=1")
            node.down()
            log.info("node %s down", cfg.name)
    if node.reexec:  # SIGHUP: this pid runs the installed code, which takes the node over (adoption.py)
        adoption.let_go(node, stop_children=False)
        adoption.reexec(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    logs.setup("supervisor")
    try:
        cfg, _ = process_args("nfactor-supervisor", __doc__, argv)
        return run_foreground(cfg)
    except (NFactorError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
