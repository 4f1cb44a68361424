"""A runtime (paper 3.3): one process pinned to one core, one single-threaded
event loop over its AF_XDP socket, its control endpoint and its query
socket, one actor per flow.

    python -m nfactor_xdp.dataplane.runtime --config-json CONFIG --id N

(the supervisor starts it so, with the node's whole configuration).
"""
from __future__ import annotations

import os
import select
import socket
import sys
import time

from .. import logs
from ..formats import config as nodeconf
from ..formats import marker, query
from ..formats.config import NodeConfig, process_args, stop_on_signals
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from ..kern import grace
from ..kern import layouts as L
from ..kern.maps import NodeMaps
from ..kern.xsk import XskSocket
from . import nf as nf_api
from .actor import Actor
from .collector import Collector
from .faults import FaultHooks
from .flowtable import FlowTable
from .lifetime import Lifetime
from .arrivals import Incoming
from .migration import Migrator
from .offloader import Offloads
from .fragments import FragmentPath, Reassembler
from .packet import FLOW, TCP, UDP, V4_L4, V4_SRC, Packet, classify
from .queries import QUERIES
from .replication import Replicator
from .takeover import Takeover
from .rules import Policy, RuleError
from .view import RUNNING, STARTING, View

HOUSEKEEPING_INTERVAL = 1.0
MIGRATE_WINDOW = 1.0  # seconds over the load threshold before a runtime sheds flows
FLOW_END_BATCH = 400  # ended flows per message to the switch agent (a worker host): ~35 KB
IDLE_POLL_MS = 100
SHED_SHARE = 5      # an overloaded runtime moves 1/SHED_SHARE of its flows
FAST_PATH_BYTES = slice(V4_SRC, V4_L4 + 4)  # IPv4 addresses and ports: one direction of a flow
MARKER_LENGTHS = frozenset(marker.V4_LENGTHS)

log = logs.get("runtime")


class Runtime:
    def __init__(self, cfg: NodeConfig, rt_id: int, policy: Policy | None = None, controlled: bool = False):
        """controlled: part of a node (registers with its controller, which
        gives it the policy); without, a runtime alone (tests, benchmarks)."""
        self.cfg = cfg
        self.id = rt_id
        self.ifname = nodeconf.runtime_ports(rt_id)[1]
        self.core = cfg.core_of(rt_id)
        self.flows = FlowTable()
        self.fast = self.flows.fast  # the per-packet path's hot dict, bound once
        self.view = View(rt_id)
        self.hooks = FaultHooks()
        self.stopping = False
        self.started = time.time()
        self.now = time.monotonic()
        self.stats = {"dropped_not_flow": 0, "flows_created": 0, "flows_expired": 0, "idle_waits": 0,
                      "load_migrations": 0, "control_errors": 0}
        # the longest frames left in the ring after a batch waited for the next one, and what ran meanwhile
        self.stall = {"max_ms": 0.0, "after": ""}
        self._overloaded = 0
        self.policy = Policy()
        self.table = self.policy.table()
        self.nf_instances: dict[int, nf_api.NetworkFunction] = {}
        self.policy_version = 0
        self.offloads = Offloads(rt_id, None, None, grace.Inline(), enabled=False)  # on a node: start()
        self.set_policy(policy or Policy())
        self.xsk: XskSocket | None = None
        self.maps: NodeMaps | None = None
        self.ctl: query.Server | None = None
        self.ep: Endpoint | None = None
        # (a list: with controllers on several hosts, each is sent to; only the leader listens)
        self.controller = nodeconf.controller_addresses(cfg) if controlled else None
        self.heartbeats = nodeconf.controller_addresses(cfg, "heartbeat") if controlled else None
        self.migrator = Migrator(self.flows, self.view, make_actor=self.make_actor, transmit=self.transmit,
                                 on_left=self._flow_left, hooks=self.hooks, max_concurrent=cfg.max_migrations)
        self.collector = Collector()
        self.replicator = Replicator(self.flows, self.view, cfg.snapshot_every, make_actor=self.make_actor,
                                     replay=self.replay_held, transmit=self.transmit, on_recovered=self._recovered)
        self.takeover = Takeover(self.replicator, self.flows, self.view, make_actor=self.make_actor,
                                 entry_runtime=self._entry_runtime, arrivals=self.migrator,
                                 enabled=cfg.takeover == "on")
        self.replicator.busy = self.takeover.busy
        self.replicator.owner = self._entry_runtime
        self.takeover.freeze = self.collector.freeze
        self.lifetime = Lifetime(rt_id, self.flows, self.replicator, self.stats, max_flows=cfg.max_flows,
                                 idle_timeout=cfg.idle_timeout)
        # On a node every frame begins with the switch's ingress tag (nfactor_shared.h): kept
        # for the way back (forwarded, held, replayed), skipped by whatever parses the frame.
        self.skip = 0
        self.fragments = FragmentPath(Reassembler(cfg.frag_max_datagrams, cfg.frag_max_bytes, cfg.frag_timeout),
                                      self.flows.get, self.new_actor, self.transmit, self.replicator)
        self.registered = False
        self.refused: str | None = None
        self._load_mark = (time.monotonic(), sum(os.times()[:2]), 0)

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        os.sched_setaffinity(0, {self.core})
        self.xsk = XskSocket(socket.if_nametoindex(self.ifname), 0)
        self.maps = NodeMaps(self.cfg.name)
        # On a worker host the flow table and the offloads are the ingress host's, out of reach: ended
        # flows' entries age out there, and every frame comes here (docs/architecture.md, Hosts).
        remote = self.cfg.host_id != 0
        self.lifetime.maps = None if remote else self.maps
        if self.cfg.offload == "on" and not remote:
            self._start_offload()
        self.skip = self.migrator.skip = L.C["NFX_INGRESS_TAG_LEN"]
        self.ctl = query.Server(nodeconf.runtime_socket(self.cfg.name, self.id), self.on_request)
        if self.controller:
            # hold frames until the flows' state is back from the peers (recovery)
            self.replicator.recovering = True
        # Registering the socket is what makes frames flow to us.
        self.maps["xsks"].set(self.id, self.xsk.fd)
        if self.controller:
            self.ep = Endpoint(nodeconf.control_address(self.cfg, f"rt{self.id}"),
                               ClusterKey.load_or_create(nodeconf.cluster_key_path()), f"rt{self.id}")
            self.migrator.attach(self.ep, nodeconf.control_address(self.cfg, "switch"))
            self.replicator.attach(self.ep)
            self.takeover.attach(self.ep, nodeconf.control_address(self.cfg, "switch"))
            if remote:
                self.lifetime.ask_agent = self._ask_agent_to_end
            self.register(recovering=True)

    def _start_offload(self) -> None:
        """Decided flows go to the switch (docs/offload.md); without the
        offloads array (an older node's pins), every packet stays here."""
        from ..kern.offloads import OffloadSlots
        try:
            slots = OffloadSlots(self.cfg.name)
        except OSError as e:
            log.warning("offload off: %s", e)
            return
        self.offloads = Offloads(self.id, slots, self.maps, grace.Background())
        self.offloads.observe_rules = self.policy.observe_rules()
        from ..kern.observe import ObserveRing
        try:
            self.offloads.ring = ObserveRing(self.cfg.name, self.id)
        except OSError as e:
            log.warning("observe mode off: %s", e)
        self.lifetime.revoke = self.offloads.revoke
        self.migrator.revoke = self.offloads.revoke_keys
        self.migrator.settle = self.offloads.settle
        self.replicator.before_replay = self._adopt_offloads

    def _adopt_offloads(self) -> None:
        entries = ((bytes.fromhex(f["key"]), f["offload"]) for f in self.maps.flows() if f["runtime"] == self.id)
        self.offloads.adopt(self.flows, entries)

    def may_offload(self, actor) -> bool:
        return (actor.migration is None and not actor.closed_at and not self.replicator.recovering
                and actor.key not in self.migrator.queued and self.flows.get(actor.key) is actor)

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
        self.offloads.grace.close()
        if self.offloads.ring is not None:
            self.offloads.ring.close()

    @property
    def state(self) -> str:
        """In the view's words: starting (recovering), running, leaving, failed."""
        if self.replicator.recovering:
            return STARTING
        if self.controller is None:
            return RUNNING
        return self.view.state(self.id) or STARTING

    # --- the controller --------------------------------------------------------
    def _recovered(self) -> None:
        self.collector.freeze()  # the recovered actors live on: the collector need not walk them again
        self.register()

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
                # frames are held until now: never process them without the node's policy
                self.refused = f"the controller's policy cannot be used here, not running without it: {e}"
                self.stopping = True  # main says why; the supervisor restarts it, backing off
                return
        self.view.update(body.get("view"))
        if recovering:
            self.replicator.start_recovery()  # registers again, as running, when done
        else:
            self.registered = True

    def on_control(self, msg: Message, addr) -> None:
        """A peer's message.  Nothing a peer sends, and no bug in handling it,
        may stop the packet loop: errors are counted and logged."""
        try:
            self._on_control(msg, addr)
        except Exception as e:
            self.stats["control_errors"] += 1
            log.error("error handling %s: %s: %s", msg.type.name, type(e).__name__, e)

    def _on_control(self, msg: Message, addr) -> None:
        t = msg.type
        if t == MsgType.VIEW:
            self.view.update(msg.body)
        elif t == MsgType.RULES:
            try:
                self.set_policy(Policy.from_dict(msg.body.get("policy")))
            except RuleError as e:
                log.error("the controller pushed a bad policy, keeping the current one: %s", e)
        elif t == MsgType.REGISTER and msg.body.get("again") and self.registered:
            self.register()  # the controller lost us (e.g. restarted from an old log)
        elif t == MsgType.MIGRATE_CREATE:
            self.migrator.on_create(msg, addr)
        elif t == MsgType.MIGRATE_STATE:
            self.migrator.on_state(msg, addr)
        elif t == MsgType.MIGRATE_DONE and msg.body.get("abort"):
            self.migrator.on_abort(msg, addr)
        elif t == MsgType.SNAPSHOT:
            self.replicator.on_snapshot(msg, addr)
        elif t == MsgType.SNAPSHOT_FETCH:
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
        load["not_migratable"] = self.migrator.not_migratable()  # a drain ends without them
        self.ep.send(self.heartbeats, MsgType.HEARTBEAT, {"id": self.id, "load": load})
        self.rebalance(load)

    def rebalance(self, load: dict) -> None:
        """Runtime-initiated migrations: drain when leaving; shed part of the
        flows to the least loaded peer when over the load threshold."""
        if self.migrator.out or self.migrator.switch_agent is None:
            return
        peers = self.view.peers()
        if not peers or not self.flows:
            self._overloaded = 0
            return
        keys = [k for k, a in self.flows.items() if a.migration is None]
        if self.view.leaving:
            for i, peer in enumerate(peers):  # spread the flows over every running peer
                part = keys[i::len(peers)]
                if part:
                    self.migrator.start_batch(peer["id"], part)
            return
        threshold = self.cfg.migrate_threshold
        if not threshold:
            return
        self._overloaded = self._overloaded + 1 if load["cpu"] > threshold else 0
        if self._overloaded * self.cfg.heartbeat < MIGRATE_WINDOW:
            return
        target = min(peers, key=lambda e: View.cpu(e, 1.0))
        if View.cpu(target, 1.0) >= threshold:
            return  # everyone is busy: moving flows would not help
        self.migrator.start_batch(target["id"], keys[:max(1, len(keys) // SHED_SHARE)])
        self.stats["load_migrations"] += 1
        self._overloaded = 0

    # --- the per-packet path -------------------------------------------------
    def handle(self, frame) -> bool:
        """One frame (the switch's ingress tag, then the Ethernet frame): find
        its flow's actor and let it decide (True: transmit it, tag and all)."""
        f = frame[self.skip:]
        # Fast path: IPv4 without options or fragmentation, flow already seen
        # in this direction; the raw address/port bytes find the actor.  The
        # checks are literals on purpose (the hottest line): ethertype 0x0800,
        # version 4 with IHL 5, no MF flag or fragment offset, protocol byte;
        # a frame as long as a marker goes the slow way, which knows one.
        if f[12] == 8 and f[13] == 0 and f[14] == 0x45 and not (f[20] & 0x3F or f[21]):
            hit = self.fast.get(f[FAST_PATH_BYTES].tobytes())
            if hit is not None and hit[0].proto == f[23] and len(f) not in MARKER_LENGTHS:
                actor = hit[0]
                if actor.observing is not None:
                    self.offloads.drain_all()  # its copies before it (a punted FIN after the data)
                verdict = actor.on_packet(f, hit[1], V4_L4, self.now)
                if actor.ask_at:
                    self.offloads.after_packet(actor, f, V4_L4)
                return verdict
        return self.handle_slow(frame)

    def handle_slow(self, frame) -> bool:
        """`frame` with its ingress tag: held frames keep it, parsers skip it."""
        if self.replicator.recovering:
            self.replicator.hold(frame)  # until the actors are back from the snapshots
            return False
        tag, frame = frame[:self.skip], frame[self.skip:]
        kind, key, direction, l4 = classify(frame)
        if kind != FLOW:
            # The switch sends us flows only; anything else is counted and dropped.
            self.stats["dropped_not_flow"] += 1
            return False
        if l4 < 0:  # a fragment: the chain sees its datagram, whole, as its own flow
            return self.fragments.on_fragment(frame, key, self.now, self.policy.fragments, bytes(tag))
        actor = self.flows.get(key)
        if self.migrator.late_marker(frame, l4, key[36], actor):
            return False  # a copy of an earlier migration's marker, whenever it comes: dropped, counted
        if actor is None:
            if self.migrator.left_here(key):
                return False  # the flow migrated away: a frame behind its marker, counted (after_marker)
            if not self.lifetime.admit():
                return False  # full of flows that cannot be given up now: refused, counted
            actor = self.fragments.adopt(key) or self.new_actor(frame, key, direction, l4)
            self.flows.add(actor)
        elif actor.observing is not None:
            self.offloads.drain_all()  # its copies before it (a punted FIN after the data)
        migration = actor.migration
        if migration is not None:
            if isinstance(migration, Incoming):
                self.migrator.buffer(actor, bytes(tag) + frame, direction, l4)  # until the state arrives
                return False
            if self.migrator.on_frame(actor, frame, l4):
                return False  # the marker: consumed here (counted by the migrator)
            return actor.on_packet(frame, direction, l4, self.now)
        if l4 == V4_L4 and frame[14] == 0x45 and (actor.proto == TCP or actor.proto == UDP):  # the fast path's kind
            self.flows.learn_fast(frame[FAST_PATH_BYTES].tobytes(), actor, direction)
        verdict = actor.on_packet(frame, direction, l4, self.now)
        if actor.ask_at:
            self.offloads.after_packet(actor, frame, l4)
        return verdict

    def replay_held(self, frame) -> bool:
        """A frame held while recovering.  One of a flow that has no actor here
        and whose switch entry names another runtime arrived before a peer
        took the flow over (takeover.py): dropped and counted, never made
        into a second actor of the flow."""
        kind, key, _, l4 = classify(frame[self.skip:])
        if kind == FLOW and l4 >= 0 and self.flows.get(key) is None:
            owner = self._entry_runtime(key)
            if owner is not None and owner != self.id:
                self.replicator.recovery["taken_over"] += 1
                return False
        return self.handle_slow(frame)

    def _ask_agent_to_end(self, keys: list[bytes]) -> None:
        """A worker host's ended flows: their entries are the ingress switch's."""
        for i in range(0, len(keys), FLOW_END_BATCH):
            self.ep.send(nodeconf.control_address(self.cfg, "switch"), MsgType.FLOW_END,
                         {"runtime": self.id, "keys": [k.hex() for k in keys[i:i + FLOW_END_BATCH]]})

    def _entry_runtime(self, key: bytes) -> int | None:
        if self.maps is None or self.cfg.host_id:
            return None  # not known here (a worker host has no flow table)
        return self.maps.flow_runtime(key)

    def transmit(self, frame) -> bool:
        """Send a frame that is not in the UMEM (a replayed one)."""
        if self.xsk.send_frame(frame):
            return True
        self.xsk.reclaim()
        return self.xsk.send_frame(frame)

    def new_actor(self, frame, key: bytes, direction: int, l4: int, replicate: bool = True) -> Actor:
        """A flow's first frame: find its chain (rules see the first frame's
        orientation) and give it an actor with a fresh state per NF."""
        first = Packet(frame, 0, l4, key[36])
        chain, rule_id = self.table.lookup(first.src, first.dst, first.proto, first.sport, first.dport)
        self.stats["flows_created"] += 1
        actor = self.make_actor(key, direction, chain, rule_id)
        if not replicate:
            actor.replicator = None  # a fragments-only actor (fragments.py): not this runtime's flow
        elif actor.replicator is not None:
            self.replicator.due(actor)  # a first snapshot: every flow exists on its replica from the start
        return actor

    def make_actor(self, key: bytes, orig_dir: int, chain: int, rule_id: int) -> Actor:
        """An actor with the runtime's NF instances for `chain` (raises NFError
        for a chain naming an unknown NF)."""
        nfs = [self.nf_instance(t) for t in nf_api.decode_chain(chain)]
        actor = Actor(key, orig_dir, self.now, chain, nfs, rule_id,
                      replicator=self.replicator if self.replicator.active else None)
        self.offloads.watch(actor)
        return actor

    def _flow_left(self, actor: Actor) -> None:
        self.replicator.flow_ended(actor)

    def nf_instance(self, type_id: int) -> nf_api.NetworkFunction:
        """One instance of each NF per runtime, shared by every actor (paper 3.4)."""
        inst = self.nf_instances.get(type_id)
        if inst is None:
            cls = nf_api.by_id(type_id)
            inst = self.nf_instances[type_id] = cls()
            inst.init(self.policy.nf_config.get(cls.name, {}))
        return inst

    def set_policy(self, policy: Policy) -> None:
        """New rules apply to new flows; NFs get their new config at once, and
        offloaded flows come back to be decided again under it."""
        if policy.to_dict() == self.policy.to_dict():  # (registering again): nothing changes
            self.policy_version += 1
            return
        offloads = getattr(self, "offloads", None)
        if offloads is not None and offloads.enabled:
            offloads.revoke_all()
            for actor in self.flows.values():
                if actor.ask_at:
                    actor.ask_at = actor.packets[0] + actor.packets[1] + 1
        for inst in self.nf_instances.values():
            inst.init(policy.nf_config.get(inst.name, {}))
        if offloads is not None:
            offloads.observe_rules = policy.observe_rules()
        self.policy = policy
        self.table = policy.table()
        self.policy_version += 1

    def run(self) -> None:
        xsk, ctl, handle, batch, ep, lifetime = self.xsk, self.ctl, self.handle, self.cfg.batch, self.ep, self.lifetime
        poller = select.poll()
        poller.register(xsk.fd, select.POLLIN)
        poller.register(ctl.fileno(), select.POLLIN)
        if ep:
            poller.register(ep.fileno(), select.POLLIN)
        offloads = self.offloads
        migrator = self.migrator
        migrator.defer_states = True  # (migration.py: states leave after the frames before their marker)
        if offloads.grace.fileno() is not None:  # a revocation's grace period has passed
            poller.register(offloads.grace.fileno(), select.POLLIN)
        ring = offloads.ring
        if ring is not None:  # copies for observing NFs (observe mode)
            poller.register(ring.fileno(), select.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        self.collector.start()
        since_housekeeping = 0  # frames
        full_at, stall_after = 0.0, ""  # the ring still held frames after a batch: since when, and after what
        next_heartbeat = time.monotonic()
        idle_ms = min(IDLE_POLL_MS, int(self.cfg.heartbeat * 500) or 1)
        batches = 0
        while not self.stopping:
            self.now = time.monotonic()
            if offloads.watching:
                offloads.drain(self.now)  # copies first: they are older than what the ring holds now
            if full_at:
                stall = (self.now - full_at) * 1e3
                if stall > self.stall["max_ms"]:
                    self.stall["max_ms"], self.stall["after"] = round(stall, 3), stall_after
            got = xsk.forward_batch(handle, batch)
            if migrator.states_due:  # the batch's frames are sent: now the states of the flows it ended here
                migrator.send_states()
            since_housekeeping += got
            full_at, stall_after = (time.monotonic() if got == batch else 0.0), "batch"
            if offloads.candidates or offloads.revoking:
                # with the batch sent; hand-overs only once the ring is empty (offloader.py)
                offloads.flush(self.may_offload, time.monotonic(), drained=got < batch)
            if offloads.pending:
                offloads.poll()
            if got:
                batches += 1
                if lifetime.ended or lifetime.evicted_offloaded:
                    lifetime.flush()  # switch entries of flows given up for new ones
                if ep:
                    # peers' messages (migrations) every batch: a non-blocking recv is cheap
                    for msg, addr in ep.receive(256):
                        self.on_control(msg, addr)
                        stall_after = msg.type.name
                if batches & 15:
                    continue
                # Under load, still answer queries (one per turn: a listing's pages
                # come between batches) and run timers.
                ctl.serve_pending(1)
            else:
                self.stats["idle_waits"] += 1
                # (a flow waiting to be handed over at a quiet moment: look again soon)
                wait = 0 if self.takeover.queue else 2 if offloads.candidates or self.replicator.later else idle_ms
                for fd, _ in poller.poll(wait):
                    if fd == ctl.fileno():
                        ctl.serve_pending(1)
                    elif fd == offloads.grace.fileno():
                        offloads.grace.drain_event()
                self.now = time.monotonic()
            if ep:
                for msg, addr in ep.receive(256):
                    self.on_control(msg, addr)
                ep.tick(self.now)
                if self.migrator.out:
                    self._guarded(self.migrator.tick, self.now)
                if self.takeover.queue:
                    stall_after = "takeover"
                    self._guarded(self.takeover.step, self.now)
                if self.replicator.later:
                    self._guarded(self.replicator.tick, self.now)
                if self.replicator.pending:
                    stall_after = "replication"
                    try:
                        self.replicator.flush()
                    except Exception as e:  # never let replication stop forwarding
                        self.stats["control_errors"] += 1
                        self.replicator.pending.clear()
                        log.error("snapshot flush: %s: %s", type(e).__name__, e)
                if self.now >= next_heartbeat:
                    self._guarded(self.send_heartbeat)
                    next_heartbeat = self.now + self.cfg.heartbeat
            if self.now >= next_housekeeping:
                stall_after = "housekeeping"
                if self.replicator.unverified and not self.replicator.recovering:
                    self._guarded(self.replicator.verify)
                self._guarded(self.fold_offloaded)
                self.expire_idle()
                if not since_housekeeping:
                    self.collector.quiet(self.now)  # a full collection costs nothing while no frame comes
                since_housekeeping = 0
                next_housekeeping = self.now + HOUSEKEEPING_INTERVAL

    def _guarded(self, fn, *args) -> None:
        """A timer of the control side: an error in it is counted and logged,
        and never stops the packet loop (as errors in messages' handlers)."""
        try:
            fn(*args)
        except Exception as e:
            self.stats["control_errors"] += 1
            log.error("%s: %s: %s", fn.__name__, type(e).__name__, e)

    def fold_offloaded(self) -> None:
        """The switch's counts into the offloaded flows' states (their last_seen
        too, for expiry), and a snapshot of each that moved: their packets no
        longer reach the every-K-packets trigger."""
        for actor in self.offloads.fold_all():
            if actor.replicator is not None:
                actor.replicator.due(actor)

    def expire_idle(self) -> None:
        """Release actors idle for idle_timeout, or closed (FIN both ways, RST)
        for CLOSE_LINGER; their switch entries go too (lifetime.py)."""
        self.lifetime.expire(self.now)
        self.migrator.expire_arrivals(self.now)  # arrivals whose state will never come
        self.fragments.expire(self.now, self.now - self.cfg.idle_timeout)

    # --- queries -------------------------------------------------------------
    def on_request(self, req: dict) -> dict:
        handler = QUERIES.get(req["op"])
        if handler is None:
            raise ValueError(f"unknown op {req['op']!r} (known: {', '.join(sorted(QUERIES))})")
        return handler(self, req)

    def packet_counts(self) -> dict:
        """Where every frame this runtime received went.  received =
        forwarded + held + markers + each drop; held frames (an arriving
        flow's, everything while recovering, IP fragments until their
        datagram is whole) are sent later, counted in
        sent_later; chain drops are what the NFs dropped (the rest of the
        frames the handler did not forward, every other reason being counted
        where it happens)."""
        xs = self.xsk.statistics()
        mig, rec = self.migrator.stats, self.replicator.recovery
        frag = self.fragments.stats
        held = {"migration": mig["buffered"], "recovery": rec["buffered"], "fragments": frag["held"]}
        dropped = {"not_flow": self.stats["dropped_not_flow"], "late_marker": mig["late_markers"],
                   "after_marker": mig["after_marker_dropped"],
                   "migration_buffer_full": mig["buffer_overflow"], "recovery_buffer_full": rec["buffer_overflow"],
                   "handler_error": xs["handler_error_frames"], "fragments": frag["dropped"],
                   "flow_cap": self.stats["dropped_flow_cap"]}
        not_forwarded = xs["dropped_by_handler"]
        dropped["chain"] = not_forwarded - sum(held.values()) - mig["markers_consumed"] - sum(dropped.values())
        dropped["tx_ring_full"] = xs["tx_dropped_ring_full"]  # forwarded by the chain, no room to send
        # held frames go through the chain later (replayed, taken back by a source, or
        # fragments with their datagram; status()["fragments"] has those discarded unseen)
        later = mig["replayed"] + rec["replayed"] + mig["taken_back"] + frag["processed"]
        failed = mig["replay_tx_fail"] + rec["replay_tx_fail"] + frag["tx_failed"]
        taken = rec["taken_over"]  # held, then found to belong to a peer that took the flow over: not sent
        return {"frames": xs["rx_packets"], "forwarded": xs["tx_packets"] - xs["frames_injected"],
                "sent_later": xs["frames_injected"], "held": held, "markers": mig["markers_consumed"],
                "dropped": dropped, "dropped_by_chain": dropped["chain"],
                "later": {"processed": later, "sent": xs["frames_injected"], "tx_failed": failed, "taken_over": taken,
                          "dropped_by_chain": later - xs["frames_injected"] - failed - taken}}

    def limits(self) -> dict:
        """Every bound on what the runtime holds, with what it cost when hit."""
        from .arrivals import MAX_BUFFER
        from .replication import MAX_PENDING, MAX_RECOVERY_BUFFER, MAX_STORE
        mig, rep = self.migrator.stats, self.replicator
        return {
            "flows": self.lifetime.limit(),
            "migration_buffer": {"limit": MAX_BUFFER, "unit": "frames per arriving flow",
                                 "dropped": mig["buffer_overflow"]},
            "recovery_hold": {"limit": MAX_RECOVERY_BUFFER, "unit": "frames held while recovering",
                              "dropped": rep.recovery["buffer_overflow"]},
            "snapshots_pending": {"limit": MAX_PENDING, "unit": "flows due a snapshot",
                                  "shed": rep.stats["shed"]},
            "snapshot_store": {"limit": MAX_STORE, "unit": "snapshots held for peers",
                               "refused": rep.stats["store_refused"]},
            "migrations_at_once": {"limit": self.cfg.max_migrations, "unit": "outgoing migrations",
                                   "queued": sum(len(b.waiting) for b in self.migrator.batches.values())},
            **self.fragments.limits(),
        }

    def status(self) -> dict:
        return {
            "id": self.id, "pid": os.getpid(), "core": self.core, "ifname": self.ifname,
            "state": self.state, "recovering": self.replicator.recovering,
            "uptime": round(time.time() - self.started, 3),
            "flows": len(self.flows), **self.stats, **self.packet_counts(),
            "xsk": self.xsk.statistics(), "query_errors": self.ctl.errors,
            "policy_version": self.policy_version, "rules": len(self.policy.rules),
            "registered": self.registered, "view_version": self.view.version,
            "migration": self.migrator.status(), "last_migration_error": self.migrator.last_error,
            "replication": self.replicator.status(), "takeover": self.takeover.status(), "limits": self.limits(),
            "faults_fired": self.hooks.fired, "faults_armed": dict(self.hooks.armed),
            "fragments": self.fragments.status(),
            "control_rejected": dict(self.ep.rejected) if self.ep else {},
            "callback_errors": self.ep.counters["callback_errors"] if self.ep else 0,
            "nf_errors": sum(a.nf_errors for a in self.flows.values()),
            "offload": self.offloads.status(),
            "gc": self.collector.status(), "stall": dict(self.stall),
        }


def main(argv: list[str] | None = None) -> int:
    cfg, args = process_args("nfactor-runtime", __doc__, argv, runtime=True)
    logs.setup(f"rt{args.id}", **cfg.log_options(f"rt{args.id}"))
    # No policy file read here: the controller's policy comes with the reply to
    # REGISTER, and every frame is held until then (never processed without it).
    rt = Runtime(cfg, args.id, controlled=True)
    stop_on_signals(lambda: setattr(rt, "stopping", True))
    try:
        rt.start()
        log.info("running on %s, core %d", rt.ifname, rt.core)
        rt.run()
        if rt.refused:
            raise RuleError(rt.refused)
    except Exception as e:
        log.exception("stopped by %s: %s", type(e).__name__, e)
        nodeconf.write_exit_reason(cfg.name, f"rt{args.id}", f"{type(e).__name__}: {e}")
        return 1
    finally:
        rt.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
