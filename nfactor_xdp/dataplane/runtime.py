"""A runtime (paper 3.3): one process pinned to one core, one single-threaded
event loop over its AF_XDP socket and its query socket, one actor per flow.

    python -m nfactor_xdp.dataplane.runtime --node NAME --id N --ifname rtN --core C
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time

from . import nf as nf_api
from ..formats import config as nodeconf, query as rtctl
from .actor import Actor
from ..kern.maps import NodeMaps
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from .migration import Migrator
from .replication import Replicator
from .packet import FLOW, Packet, classify
from .rules import Policy, RuleError, load_policy
from ..kern.xsk import XskSocket

HOUSEKEEPING_INTERVAL = 1.0
MIGRATE_WINDOW = 1.0  # seconds over the load threshold before a runtime sheds flows
IDLE_POLL_MS = 100
CLOSE_LINGER = 2.0  # seconds an actor outlives its TCP close (last ACKs, retransmits)


class Runtime:
    def __init__(self, node: str, rt_id: int, ifname: str, core: int | None,
                 idle_timeout: float = 30.0, batch: int = 64, policy: Policy | None = None,
                 controller: int | None = None, heartbeat: float = 0.1, switch_agent: int | None = None,
                 max_migrations: int = 1000, migrate_threshold: float = 0.0, snapshot_every: int = 10):
        self.node = node
        self.id = rt_id
        self.ifname = ifname
        self.core = core
        self.idle_timeout = idle_timeout
        self.batch = batch
        self.flows: dict[bytes, Actor] = {}
        self.fast: dict[bytes, tuple[Actor, int]] = {}  # raw IPv4 addresses+ports -> (actor, direction)
        self.stopping = False
        self.started = time.time()
        self.now = time.monotonic()
        self.stats = {"dropped_not_flow": 0, "flows_created": 0, "flows_expired": 0, "idle_waits": 0,
                      "load_migrations": 0, "control_errors": 0}
        self.migrate_threshold = migrate_threshold
        self._overloaded = 0
        self.policy = Policy()
        self.table = self.policy.table()
        self.nf_instances: dict[int, nf_api.NetworkFunction] = {}
        self.policy_version = 0
        self.set_policy(policy or Policy())
        self.xsk: XskSocket | None = None
        self.maps: NodeMaps | None = None
        self.ctl: rtctl.Server | None = None
        self.controller = ("127.0.0.1", controller) if controller else None
        self.migrator = Migrator(self, ("127.0.0.1", switch_agent) if switch_agent else None, max_migrations)
        self.replicator = Replicator(self, snapshot_every)
        self.last_migration_error = ""
        self.heartbeat = heartbeat
        self.ep: Endpoint | None = None
        self.registered = False
        self.view: dict = {}
        self._load_mark = (time.monotonic(), sum(os.times()[:2]), 0)

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})
        ifindex = socket.if_nametoindex(self.ifname)
        self.xsk = XskSocket(ifindex, 0)
        self.maps = NodeMaps(self.node)
        self.ctl = rtctl.Server(nodeconf.runtime_socket(self.node, self.id), self.on_request)
        if self.controller:
            # hold frames until the flows' state is back from the peers (recovery)
            self.replicator.recovering = True
        # Registering the socket is what makes frames flow to us.
        self.maps["xsks"].set(self.id, self.xsk.fd)
        if self.controller:
            self.ep = Endpoint(("127.0.0.1", 0), ClusterKey.load_or_create(nodeconf.cluster_key_path()),
                               f"rt{self.id}")
            self.register(recovering=True)

    # --- the controller --------------------------------------------------------
    def register(self, recovering: bool = False) -> None:
        """Tell the controller we are up; it marks us running in the switch
        (or starting, while we recover our flows' state) and answers with the
        rules and the view.  Retried until it answers."""
        self.registered = False
        self.ep.request(self.controller, MsgType.REGISTER,
                        {"id": self.id, "pid": os.getpid(), "core": self.core, "port": self.ifname,
                         "recovering": recovering},
                        lambda msg: self.on_registered(msg, recovering), timeout=0.2, retries=1_000_000)

    def on_registered(self, msg: Message, recovering: bool = False) -> None:
        body = msg.body
        if body.get("policy") is not None:
            try:
                self.set_policy(Policy.from_dict(body["policy"]))
            except RuleError as e:
                print(f"runtime {self.id}: controller sent a bad policy: {e}", file=sys.stderr, flush=True)
        self.view = body.get("view") or {}
        if recovering:
            self.replicator.start_recovery(self.view)  # registers again, as running, when done
        else:
            self.registered = True

    def on_control(self, msg: Message, addr) -> None:
        """A peer's message.  Nothing a peer sends, and no bug in handling it,
        may stop the packet loop: errors are counted and logged."""
        try:
            self._on_control(msg, addr)
        except Exception as e:
            self.stats["control_errors"] += 1
            print(f"runtime {self.id}: error handling {msg.type!r}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)

    def _on_control(self, msg: Message, addr) -> None:
        if msg.type == MsgType.VIEW:
            self.view = msg.body
        elif msg.type == MsgType.RULES:
            try:
                self.set_policy(Policy.from_dict(msg.body.get("policy")))
            except (RuleError, AttributeError):
                pass
        elif msg.type == MsgType.REGISTER and msg.body.get("again") and self.registered:
            self.register()  # the controller lost us (e.g. restarted from an old log)
        elif msg.type == MsgType.MIGRATE_CREATE:
            self.migrator.on_create(msg, addr)
        elif msg.type == MsgType.MIGRATE_STATE:
            self.migrator.on_state(msg, addr)
        elif msg.type == MsgType.MIGRATE_DONE and msg.body.get("abort"):
            self.migrator.on_abort(msg, addr)
        elif msg.type == MsgType.SNAPSHOT:
            self.replicator.on_snapshot(msg, addr)
        elif msg.type == MsgType.SNAPSHOT_FETCH:
            self.replicator.on_fetch(msg, addr)

    def load(self) -> dict:
        """CPU share of one core, memory, flows and packet rate since the last call."""
        now, cpu, frames = time.monotonic(), sum(os.times()[:2]), self.xsk.rx_packets
        t0, cpu0, frames0 = self._load_mark
        self._load_mark = (now, cpu, frames)
        dt = max(now - t0, 1e-6)
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"cpu": round(min(1.0, (cpu - cpu0) / dt), 3), "rss": rss, "flows": len(self.flows),
                "pps": round((frames - frames0) / dt, 1)}

    def send_heartbeat(self) -> None:
        load = self.load()
        load["migrating"] = len(self.migrator.out)
        self.ep.send(self.controller, MsgType.HEARTBEAT, {"id": self.id, "load": load})
        self.rebalance(load)

    @property
    def leaving(self) -> bool:
        """The controller marked us leaving (scale-in): move every flow away."""
        me = next((e for e in self.view.get("runtimes", []) if e.get("id") == self.id), None)
        return bool(me) and me.get("state") == "leaving"

    def rebalance(self, load: dict) -> None:
        """Runtime-initiated migrations: drain when leaving; shed part of the
        flows to the least loaded peer when over the load threshold."""
        if self.migrator.out or self.migrator.switch_agent is None:
            return
        peers = [e for e in self.view.get("runtimes", [])
                 if e.get("state") == "running" and e.get("id") != self.id and e.get("addr")]
        if not peers or not self.flows:
            self._overloaded = 0
            return
        if self.leaving:
            keys = [k for k, a in self.flows.items() if a.migration is None]
            for i, peer in enumerate(peers):  # spread the flows over every running peer
                part = keys[i::len(peers)]
                if part:
                    self.migrator.start_batch(peer["id"], part)
            return
        if not self.migrate_threshold:
            return
        self._overloaded = self._overloaded + 1 if load["cpu"] > self.migrate_threshold else 0
        if self._overloaded * self.heartbeat < MIGRATE_WINDOW:
            return
        target = min(peers, key=lambda e: (e.get("load") or {}).get("cpu", 1.0))
        if (target.get("load") or {}).get("cpu", 1.0) >= self.migrate_threshold:
            return  # everyone is busy: moving flows would not help
        keys = [k for k, a in self.flows.items() if a.migration is None]
        self.migrator.start_batch(target["id"], keys[:max(1, len(keys) // 5)])
        self.stats["load_migrations"] += 1
        self._overloaded = 0

    def stop(self) -> None:
        if self.maps is not None:
            try:
                self.maps["xsks"].delete(self.id)
            except OSError:
                pass
            self.maps.close()
        if self.ctl is not None:
            self.ctl.close()
        if self.ep is not None:
            self.ep.close()
        if self.xsk is not None:
            self.xsk.close()

    # --- the per-packet path -------------------------------------------------
    def handle(self, frame) -> bool:
        """One frame: find its flow's actor and let it decide (True: transmit)."""
        # Fast path: IPv4 without options or fragmentation, flow already seen
        # in this direction; the raw address/port bytes find the actor.
        if frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45 and not (frame[20] & 0x3F or frame[21]):
            hit = self.fast.get(frame[26:38].tobytes())
            if hit is not None and hit[0].proto == frame[23]:
                return hit[0].on_packet(frame, hit[1], 34, self.now)
        return self.handle_slow(frame)

    def handle_slow(self, frame) -> bool:
        if self.replicator.recovering:
            self.replicator.hold(frame, 0, -1)  # until the actors are back from the snapshots
            return False
        kind, key, direction, l4 = classify(frame)
        if kind != FLOW:
            # The switch sends us flows only; anything else is counted and dropped.
            self.stats["dropped_not_flow"] += 1
            return False
        actor = self.flows.get(key)
        if actor is None:
            if self.migrator.late_marker(frame):
                return False
            actor = self.flows[key] = self.new_actor(frame, key, direction, l4)
        if actor.migration is not None:
            if actor.migration == "in":
                self.migrator.buffer(actor, frame, direction, l4)  # until the state arrives
                return False
            if self.migrator.on_frame(actor, frame, l4):
                return False  # the marker: consumed here
            return actor.on_packet(frame, direction, l4, self.now)
        if l4 == 34 and frame[14] == 0x45:
            raw = frame[26:38].tobytes()
            if raw not in self.fast:
                self.fast[raw] = (actor, direction)
                actor.fast_keys.append(raw)
        return actor.on_packet(frame, direction, l4, self.now)

    def drop_fast_path(self, actor: Actor) -> None:
        for raw in actor.fast_keys:
            self.fast.pop(raw, None)
        actor.fast_keys = []

    def transmit(self, frame) -> bool:
        """Send a frame that is not in the UMEM (a replayed one)."""
        if self.xsk.send_frame(frame):
            return True
        self.xsk.reclaim()
        return self.xsk.send_frame(frame)

    def new_actor(self, frame, key: bytes, direction: int, l4: int) -> Actor:
        """A flow's first frame: find its chain (rules see the first frame's
        orientation) and give it an actor with a fresh state per NF."""
        first = Packet(frame, 0, l4, key[36])
        chain, rule_id = self.table.lookup(first.src, first.dst, first.proto, first.sport, first.dport)
        nfs = [self.nf_instance(t) for t in nf_api.decode_chain(chain)]
        self.stats["flows_created"] += 1
        replicating = self.ep is not None and self.replicator.every > 0
        actor = Actor(key, direction, self.now, chain, nfs, rule_id, replicator=self.replicator if replicating else None)
        if replicating:
            self.replicator.due(actor)  # a first snapshot: every flow exists on its replica from the start
        return actor

    def nf_instance(self, type_id: int) -> nf_api.NetworkFunction:
        """One instance of each NF per runtime, shared by every actor (paper 3.4)."""
        inst = self.nf_instances.get(type_id)
        if inst is None:
            cls = nf_api.by_id(type_id)
            inst = self.nf_instances[type_id] = cls()
            inst.init(self.policy.nf_config.get(cls.name, {}))
        return inst

    def set_policy(self, policy: Policy) -> None:
        """New rules apply to new flows; NFs get their new config at once."""
        for inst in self.nf_instances.values():
            inst.init(policy.nf_config.get(inst.name, {}))
        self.policy = policy
        self.table = policy.table()
        self.policy_version += 1

    def run(self) -> None:
        xsk, ctl, handle, batch, ep = self.xsk, self.ctl, self.handle, self.batch, self.ep
        poller = select.poll()
        poller.register(xsk.fd, select.POLLIN)
        poller.register(ctl.fileno(), select.POLLIN)
        if ep:
            poller.register(ep.fileno(), select.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        next_heartbeat = time.monotonic()
        idle_ms = min(IDLE_POLL_MS, int(self.heartbeat * 500) or 1)
        batches = 0
        while not self.stopping:
            self.now = time.monotonic()
            if xsk.forward_batch(handle, batch):
                batches += 1
                if ep:
                    # peers' messages (migrations) every batch: a non-blocking recv is cheap
                    for msg, addr in ep.receive(256):
                        self.on_control(msg, addr)
                if batches & 15:
                    continue
                # Under load, still answer queries and run timers.
                ctl.serve_pending()
            else:
                self.stats["idle_waits"] += 1
                for fd, _ in poller.poll(idle_ms):
                    if fd == ctl.fileno():
                        ctl.serve_pending()
                self.now = time.monotonic()
            if ep:
                for msg, addr in ep.receive(256):
                    self.on_control(msg, addr)
                ep.tick(self.now)
                if self.migrator.out:
                    self.migrator.tick(self.now)
                if self.replicator.pending:
                    try:
                        self.replicator.flush()
                    except Exception as e:  # never let replication stop forwarding
                        self.stats["control_errors"] += 1
                        self.replicator.pending.clear()
                        print(f"runtime {self.id}: snapshot flush: {type(e).__name__}: {e}", file=sys.stderr,
                              flush=True)
                if self.now >= next_heartbeat:
                    self.send_heartbeat()
                    next_heartbeat = self.now + self.heartbeat
            if self.now >= next_housekeeping:
                self.expire_idle()
                next_housekeeping = self.now + HOUSEKEEPING_INTERVAL

    def expire_idle(self) -> None:
        """Release actors idle for idle_timeout, or closed (FIN both ways, RST)
        for CLOSE_LINGER."""
        idle, closed = self.now - self.idle_timeout, self.now - CLOSE_LINGER
        gone = [k for k, a in self.flows.items()
                if a.last_seen < idle or (a.closed_at and a.closed_at < closed)]
        for k in gone:
            actor = self.flows.pop(k)
            for raw in actor.fast_keys:
                self.fast.pop(raw, None)
            actor.end()
            self.replicator.flow_ended(actor)
        self.stats["flows_expired"] += len(gone)

    # --- queries -------------------------------------------------------------
    def on_request(self, req: dict) -> dict:
        op = req["op"]
        if op == "ping":
            return {"ok": True, "id": self.id, "state": "running", "registered": self.registered or not self.ep}
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "flows":
            limit = req.get("limit")
            actors = list(self.flows.values())
            if isinstance(limit, int) and limit >= 0:
                actors = actors[:limit]
            return {"ok": True, "id": self.id, "flows": [a.summary(detail=bool(req.get("detail", True)))
                                                          for a in actors]}
        if op == "migrate":
            keys = list(self.flows)
            if req.get("keys"):
                keys = [bytes.fromhex(k) for k in req["keys"]]
            elif isinstance(req.get("count"), int):
                keys = keys[:max(0, req["count"])]
            keys = [k for k in keys if self.flows.get(k) is not None and self.flows[k].migration is None]
            try:
                b = self.migrator.start_batch(int(req["to"]), keys)
            except (ValueError, KeyError, TypeError) as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True, **b.report()}
        if op == "fault":  # failure injection for tests
            for k, v in req.items():
                if k in self.migrator.faults and isinstance(v, int):
                    self.migrator.faults[k] = v
            return {"ok": True, "faults": self.migrator.faults}
        if op == "migrate_status":
            b = self.migrator.batches.get(req.get("batch"))
            if b is None:
                return {"ok": False, "error": "no such migration batch"}
            return {"ok": True, **b.report(), "last_error": self.last_migration_error}
        if op == "set_policy":
            try:
                policy = Policy.from_dict(req.get("policy"))
            except RuleError as e:
                return {"ok": False, "error": str(e)}
            self.set_policy(policy)
            return {"ok": True, "policy_version": self.policy_version}
        raise ValueError(f"unknown op {op!r}")

    def packet_counts(self) -> dict:
        xs = self.xsk.statistics()
        return {"frames": xs["rx_packets"], "forwarded": xs["tx_packets"],
                "dropped": xs["dropped_by_handler"],
                "dropped_by_chain": sum(a.dropped for a in self.flows.values())}

    def status(self) -> dict:
        return {
            "id": self.id, "pid": os.getpid(), "core": self.core, "ifname": self.ifname,
            "state": "running", "uptime": round(time.time() - self.started, 3),
            "flows": len(self.flows), **self.stats, **self.packet_counts(),
            "xsk": self.xsk.statistics(), "query_errors": self.ctl.errors,
            "policy_version": self.policy_version, "rules": len(self.policy.rules),
            "registered": self.registered, "view_version": self.view.get("version"),
            "migration": {**self.migrator.stats, "in_progress": len(self.migrator.out)},
            "replication": self.replicator.status(),
            "control_rejected": dict(self.ep.rejected) if self.ep else {},
            "nf_errors": sum(a.nf_errors for a in self.flows.values()),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nfactor-runtime", description=__doc__)
    ap.add_argument("--node", required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    ap.add_argument("--core", type=int)
    ap.add_argument("--idle-timeout", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--policy", help="policy file (service chain rules, NF config)")
    ap.add_argument("--controller", type=int, help="the controller's UDP port on 127.0.0.1")
    ap.add_argument("--heartbeat", type=float, default=0.1)
    ap.add_argument("--switch-agent", type=int, help="the switch agent's UDP port on 127.0.0.1")
    ap.add_argument("--max-migrations", type=int, default=1000, help="concurrent outgoing migrations")
    ap.add_argument("--migrate-threshold", type=float, default=0.0, help="CPU load that makes it shed flows (0: off)")
    ap.add_argument("--snapshot-every", type=int, default=10, help="packets between a flow's snapshots (K)")
    a = ap.parse_args(argv)
    policy = None
    if a.policy and os.path.exists(a.policy):
        try:
            policy = load_policy(a.policy)
        except RuleError as e:
            print(f"runtime {a.id}: bad policy, starting with none: {e}", file=sys.stderr, flush=True)
    rt = Runtime(a.node, a.id, a.ifname, a.core, a.idle_timeout, a.batch, policy, a.controller, a.heartbeat,
                 a.switch_agent, a.max_migrations, a.migrate_threshold, a.snapshot_every)

    def on_signal(signum, frame):
        rt.stopping = True

    # The agent blocks these signals to wait for them; do not inherit that.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        rt.start()
        print(f"runtime {a.id}: running on {a.ifname}, core {a.core}, pid {os.getpid()}", flush=True)
        rt.run()
    except Exception as e:
        print(f"runtime {a.id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        rt.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
