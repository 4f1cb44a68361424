"""The controller (paper 3.1, 4.1): view service, failure detection, rules,
scale-out, with every change logged before it is applied.

    python -m nfactor_xdp.control.controller --config-json CONFIG

(the supervisor starts it so, with the node's whole configuration).

- Runtimes REGISTER when they start and HEARTBEAT their load; the controller
  keeps the cluster view (id, control address, port, state, load).
- A runtime that misses `miss_limit` heartbeats is marked failed; the
  supervisor also reports a runtime whose process exited (marked `exited`
  in the view: its peers then take its flows over, dataplane/takeover.py).  Every state change
  goes to the switch's runtime table at once (a failed or leaving runtime
  gets no new flows) and the new view is pushed to every runtime.
- Rules (the node's policy) live here and are pushed to every runtime that
  registers, and to all of them when they change.
- Each change of the view or rules is logged (intent, apply, success mark) in
  an SQLite WAL log; a restarted controller replays it and carries on.
- Scale-out: when the running runtimes' average CPU load stays above a
  threshold, the controller asks the supervisor for a new runtime.
"""
from __future__ import annotations

import os
import select
import sys
import time

from .. import logs
from ..formats.config import NodeConfig, process_args, stop_on_signals
from ..kern import layouts as L
from ..formats import config as nodeconf
from ..formats import fabric
from .cluster_store import EtcdStore, StoreError
from .durable_log import ControllerLog
from .host_watch import HostWatch
from .switch_tables import switch_tables
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from ..dataplane.rules import Policy, RuleError, load_policy
from ..errors import NFactorError

COMPACT_EVERY = 200  # logged changes between compactions
LOAD_PUSH_INTERVAL = 0.5  # seconds between view pushes that only carry new loads
# at most one hung runtime killed per this many seconds, node-wide: an NF that loops on some
# flow's packets hangs whichever runtime takes the flow next, and killing them all in turn
# would cost every flow of the node its last K-1 packets of state, again and again
HANG_KILL_SPACING = 60.0

log = logs.get("controller")


class RecoveryError(NFactorError):
    """The controller cannot rebuild its state (bad policy file, a log op
    that fails): it exits saying why, and the supervisor backs off."""


class Controller:
    def __init__(self, cfg: NodeConfig, store=None):
        """store: where the state lives; default the SQLite log (durable_log);
        an EtcdStore (cluster_store) this controller already leads with."""
        self.cfg = cfg
        self.node = cfg.name
        self.key = ClusterKey.load_or_create(nodeconf.cluster_key_path())
        self.ep = Endpoint(nodeconf.control_address(cfg, "controller"), self.key, "controller")
        # heartbeats alone on their own socket: a burst (or a flood) of other
        # messages cannot fill the queue they wait in and fire the failure detector
        self.hb = Endpoint(nodeconf.control_address(cfg, "heartbeat"), self.key, "controller")
        self.cfg_hosts = bool(cfg.hosts)
        self.heartbeat = cfg.heartbeat
        self.miss_limit = cfg.miss_limit
        self.hang_timeout = max(cfg.hang_timeout, cfg.heartbeat * cfg.miss_limit) if cfg.hang_timeout else 0.0
        self.kills: dict[int, tuple] = {}    # runtime id -> (pid, when) of the last kill asked for a hung one
        self.last_hang_kill = -HANG_KILL_SPACING
        self.hang_spared: set = set()        # (runtime, pid) left hung, said once
        self.scale_threshold = cfg.scale_threshold
        self.scale_window = cfg.scale_window
        self.max_runtimes = cfg.max_runtimes
        self.scale_cooldown = cfg.scale_cooldown
        self.maps = switch_tables(cfg, self.ep)  # the pinned maps, or through the agent from a worker host
        self.log = store if store is not None else ControllerLog(nodeconf.controller_log_path(cfg.name))
        self.view: dict[int, dict] = {}      # runtime id -> entry (durable part: id, state, addr, core, port)
        self.live: dict[int, dict] = {}      # runtime id -> last heartbeat time and load (not logged)
        self.policy = Policy()
        self.view_version = 0
        self.changes = 0
        self.started = time.monotonic()
        self.overloaded_since: float | None = None
        self.idle_since: float | None = None
        self.scale_in_threshold = cfg.scale_in_threshold
        self.min_runtimes = cfg.min_runtimes
        self.last_scale = 0.0
        self.stopping = False
        self.recovered = False  # only a recovered state may be compacted into the log
        # with hosts: a worker host's failure (host_watch.py), after twice a runtime's failure time
        self.host_watch = HostWatch(self, len(cfg.host_addresses), 2 * cfg.heartbeat * cfg.miss_limit)
        self.stats = {"heartbeats": 0, "registers": 0, "failures_detected": 0, "exits_reported": 0,
                      "hung_killed": 0, "hung_spared": 0, "scale_outs": 0, "scale_ins": 0, "view_pushes": 0, "replayed_ops": 0, "restarted_at": time.time()}

    # --- durable state -------------------------------------------------------
    def recover(self) -> None:
        """Rebuild view and rules from the log; then the switch table from the view."""
        snapshot, ops, pending = self.log.replay()
        if snapshot:
            self.view = {int(k): v for k, v in snapshot["view"].items()}
            self.policy = Policy.from_dict(snapshot["policy"])
            self.view_version = snapshot.get("view_version", 0)
        elif os.path.exists(nodeconf.policy_path(self.node)):
            # never run the node without its NFs: a bad policy file stops us here (RecoveryError)
            try:
                self.policy = load_policy(nodeconf.policy_path(self.node))
            except RuleError as e:
                raise RecoveryError(f"cannot load the node's policy: {e}") from None
        for i, op in enumerate(ops):
            self._replay(op, f"logged op {i + 1} of {len(ops)}")
        for seq, op in pending:
            # died between intent and success mark: every op is idempotent, apply it again
            self._replay(op, f"pending op (seq {seq})")
            self.log.done(seq)
        self.stats["replayed_ops"] = len(ops) + len(pending)
        if ops or pending:
            self.log.compact(self.snapshot())  # what was replayed becomes the new snapshot
        now = time.monotonic()
        for rt_id, entry in self.view.items():
            # a grace period: runtimes kept running while we were away
            self.live[rt_id] = {"last": now, "load": {}}
            entry.pop("stopping", None)  # the supervisor may never have heard: asked again when drained
        self._sync_switch()
        self.host_watch.recover()
        self.recovered = True

    def _replay(self, op, what: str) -> None:
        try:
            self._apply(op)
        except Exception as e:  # a log this controller cannot apply: say which op and why
            raise RecoveryError(f"replaying the log {nodeconf.controller_log_path(self.node)} failed at "
                                f"{what} {str(op)[:200]}: {type(e).__name__}: {e}") from None

    def _change(self, op: dict) -> None:
        """Log the intent, apply, mark success (paper 4.1)."""
        seq = self.log.intend(op)
        self._apply(op)
        self.log.state_changed(self.snapshot)  # (etcd: written before the switch sees it)
        if "id" in op:
            self._sync_switch(op["id"])
        self.log.done(seq)
        self.changes += 1
        if self.changes % COMPACT_EVERY == 0:
            self.log.compact(self.snapshot())

    def _apply(self, op: dict) -> None:
        kind = op["op"]
        if kind == "state":
            entry = self.view.setdefault(op["id"], {"id": op["id"]})
            if "exited" not in op:  # set only while the process that failed is known dead
                entry.pop("exited", None)
            entry.update({k: v for k, v in op.items() if k not in ("op",)})
            if entry.get("state") != "leaving":  # a drain is over (a restarted runtime registers)
                entry.pop("stopping", None)
                entry.pop("restart", None)
            self.view_version += 1
        elif kind == "remove":
            self.view.pop(op["id"], None)
            self.live.pop(op["id"], None)
            self.view_version += 1
        elif kind == "policy":
            self.policy = Policy.from_dict(op["policy"])

    def snapshot(self) -> dict:
        return {"view": {str(k): v for k, v in self.view.items()}, "policy": self.policy.to_dict(),
                "view_version": self.view_version}

    def _sync_switch(self, only: int | None = None) -> None:
        """The switch's runtime table follows the view (running: new flows;
        starting/leaving/failed: keep their flows, no new ones; removed: the
        slot is emptied and its flows are placed anew)."""
        ids = [only] if only is not None else list(self.view)
        for rt_id in ids:
            entry = self.view.get(rt_id)
            state = entry["state"] if entry else "none"
            try:
                self.maps.set_runtime_state(rt_id, L.C[f"NFX_RT_{state.upper()}"],
                                            host=(entry or {}).get("host", 0))
            except OSError as e:
                log.error("cannot update the switch's runtime table: %s", e)

    # --- messages ----------------------------------------------------------------
    def on_message(self, msg: Message, addr) -> None:
        t, b = msg.type, msg.body
        if t == MsgType.HEARTBEAT:
            self.on_heartbeat(b, addr)
        elif t == MsgType.REGISTER:
            self.on_register(msg, addr)
        elif t == MsgType.RUNTIME_EXITED:
            self.on_exited(b)
        elif t == MsgType.HOST_ALIVE:
            self.host_watch.on_alive(b if isinstance(b, dict) else {}, addr)
        elif t == MsgType.RUNTIME_STOP:
            rt = self._rt_id(b)
            if rt is not None and rt in self.view:
                if b.get("drain"):
                    self.drain(rt, msg, addr, restart=bool(b.get("restart")))
                else:
                    self._change({"op": "remove", "id": rt})
                    self.push_view()
        elif t == MsgType.RULES:
            self.on_rules(msg, addr)
        elif t == MsgType.STATUS:
            self.ep.reply(msg, addr, {"ok": True, **self.status()})
        elif t == MsgType.PING:
            self.ep.reply(msg, addr, {"ok": True})
        # anything else is ignored: messages from peers never crash the controller

    def _rt_id(self, body) -> int | None:
        rt = body.get("id") if isinstance(body, dict) else None
        return rt if isinstance(rt, int) and 0 <= rt < L.C["NFX_MAX_RUNTIMES"] else None

    def _host_of(self, rt: int) -> int:
        return fabric.host_of(rt) if self.cfg_hosts else 0

    def supervisor_addr(self, rt: int | None = None):
        """The supervisor of runtime rt's host (None: the ingress host's)."""
        return nodeconf.control_address(self.cfg, "supervisor", host=0 if rt is None else self._host_of(rt))

    def on_register(self, msg: Message, addr) -> None:
        rt = self._rt_id(msg.body)
        if rt is None or self.host_watch.is_fenced(rt):  # (it asks again until its host is back)
            return
        self.stats["registers"] += 1
        # a runtime recovering its flows' state keeps them but takes no new ones yet
        state = "starting" if msg.body.get("recovering") else "running"
        self._change({"op": "state", "id": rt, "state": state, "addr": _wire_addr(addr),
                      "pid": msg.body.get("pid"), "core": msg.body.get("core"), "port": msg.body.get("port"),
                      "host": self._host_of(rt)})
        self.live[rt] = {"last": time.monotonic(), "load": {}}
        self.ep.reply(msg, addr, {"ok": True, "policy": self.policy.to_dict(), "view": self.public_view()})
        self.push_view()

    def on_heartbeat(self, body, addr) -> None:
        rt = self._rt_id(body)
        if rt is None:
            return
        self.stats["heartbeats"] += 1
        entry = self.view.get(rt)
        if entry is None or entry.get("state") == "failed":
            # unknown or given up on (e.g. controller restarted from an old log): it must register again
            self.ep.send(addr, MsgType.REGISTER, {"again": True})
            return
        load = body.get("load") if isinstance(body.get("load"), dict) else {}
        self.live[rt] = {"last": time.monotonic(), "load": load}

    def on_exited(self, body) -> None:
        rt = self._rt_id(body)
        if rt is None or rt not in self.view:
            return
        self.stats["exits_reported"] += 1
        entry = self.view[rt]
        if entry["state"] != "failed" or not entry.get("exited"):
            # `exited`: the supervisor saw the process die, so it cannot be forwarding any more
            # (a missed heartbeat proves nothing of the kind): its peers may take its flows over
            log.warning("runtime %d marked failed: its process (pid %s) exited", rt, entry.get("pid"))
            self._change({"op": "state", "id": rt, "state": "failed", "why": "process exited", "exited": True})
            self.push_view()

    def on_rules(self, msg: Message, addr) -> None:
        try:
            policy = Policy.from_dict(msg.body.get("policy"))
        except (RuleError, AttributeError) as e:
            self.ep.reply(msg, addr, {"ok": False, "error": str(e)})
            return
        self._change({"op": "policy", "policy": policy.to_dict()})
        took = self.push_rules()
        self.ep.reply(msg, addr, {"ok": True, "pushed_to": took})

    def public_view(self) -> dict:
        return {"version": self.view_version,
                "runtimes": [{**e, "load": self.live.get(i, {}).get("load", {})} for i, e in sorted(self.view.items())]}

    def push_view(self) -> None:
        self.stats["view_pushes"] += 1
        view = self.public_view()
        for e in self.view.values():
            if e.get("state") != "failed" and e.get("addr"):
                self.ep.send(_peer_addr(e["addr"]), MsgType.VIEW, view)

    def push_rules(self) -> list[int]:
        took = []
        for rt, e in sorted(self.view.items()):
            if e.get("state") in ("running", "leaving") and e.get("addr"):
                self.ep.send(_peer_addr(e["addr"]), MsgType.RULES, {"policy": self.policy.to_dict()})
                took.append(rt)
        return took

    # --- periodic work ---------------------------------------------------------------
    def drain(self, rt: int, msg: Message | None = None, addr=None, restart: bool = False) -> None:
        """Scale-in: mark leaving (no new flows); the runtime migrates its
        flows away; stopped once its heartbeats say it is empty.  restart (a
        rolling restart): then the supervisor starts a fresh process on the
        same port instead of removing it."""
        running = [r for r, e in self.view.items() if e.get("state") == "running" and r != rt]
        if not running:
            if msg is not None:
                self.ep.reply(msg, addr, {"ok": False, "error": "no other running runtime to take its flows"})
            return
        self._change({"op": "state", "id": rt, "state": "leaving", "restart": restart})
        self.push_view()
        if msg is not None:
            self.ep.reply(msg, addr, {"ok": True, "id": rt})

    def finish_drains(self) -> None:
        for rt, e in list(self.view.items()):
            if e.get("state") != "leaving" or e.get("stopping"):
                continue
            load = self.live.get(rt, {}).get("load", {})
            # flows whose state cannot fit a control message never move: the drain ends without them
            stuck = load.get("not_migratable", 0)
            if load.get("flows") == stuck and load.get("migrating") == 0:
                e["stopping"] = True  # asked once; the supervisor's RUNTIME_STOP removes it from the view
                if stuck:
                    log.warning("runtime %d drained but for %d flows whose state cannot move: released when it "
                                "stops (the switch places them anew, with fresh NF state)", rt, stuck)
                # pid: the process drained, so that a request sent again (after our restart) never
                # makes the supervisor replace its successor
                self.ep.send(self.supervisor_addr(rt), MsgType.RUNTIME_STOP, {"id": rt, "why": "drained", "released": stuck,
                                                                     "restart": bool(e.get("restart")),
                                                                     "pid": e.get("pid")})

    def consider_scale_in(self, now: float) -> None:
        if not self.scale_in_threshold:
            return
        running = [rt for rt, e in self.view.items() if e.get("state") == "running"]
        if len(running) <= self.min_runtimes or any(e.get("state") == "leaving" for e in self.view.values()):
            self.idle_since = None
            return
        loads = {rt: self.live.get(rt, {}).get("load", {}).get("cpu", 1.0) for rt in running}
        if sum(loads.values()) / len(loads) > self.scale_in_threshold:
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        if now - self.idle_since >= self.scale_window and now - self.last_scale >= self.scale_cooldown:
            self.last_scale = now
            self.idle_since = None
            self.stats["scale_ins"] += 1
            self.drain(min(loads, key=loads.get))

    def detect_failures(self, now: float) -> None:
        limit = self.heartbeat * self.miss_limit
        changed = False
        for rt, e in list(self.view.items()):
            if e.get("state") not in ("running", "leaving") or e.get("stopping"):
                continue  # (stopping: asked to stop it, its silence is expected)
            last = self.live.get(rt, {}).get("last", 0.0)
            if now - last > limit:
                self.stats["failures_detected"] += 1
                log.warning("runtime %d marked failed: no heartbeat for %.2f s (limit %.2f s); its peers stop "
                            "sending it anything until it registers again", rt, now - last, limit)
                self._change({"op": "state", "id": rt, "state": "failed",
                              "why": f"no heartbeat for {now - last:.2f}s", "silent_s": round(now - last, 4)})
                changed = True
        if changed:
            self.push_view()
        self.host_watch.detect(now)
        if self.hang_timeout:
            self.kill_hung(now)

    def kill_hung(self, now: float) -> None:
        """A failed runtime silent for hang_timeout is hung, not slow (an NF
        looping, a stopped process): its frames pile up in a ring nobody
        reads and its flows are dark for as long as it lives.  The
        supervisor kills it (that very process: the pid is checked); the
        exit is reported as any, so its peers take its flows and it restarts.
        Asked again every hang_timeout while it is still there."""
        for rt, e in self.view.items():
            if e.get("state") != "failed" or e.get("exited") or e.get("stopping") or not e.get("pid"):
                continue
            silent = now - self.live.get(rt, {}).get("last", now)
            asked = self.kills.get(rt)
            if silent < self.hang_timeout or (asked and asked[0] == e["pid"] and now - asked[1] < self.hang_timeout):
                continue
            if now - self.last_hang_kill < HANG_KILL_SPACING and not (asked and asked[0] == e["pid"]):
                if (rt, e["pid"]) not in self.hang_spared:
                    self.hang_spared.add((rt, e["pid"]))
                    self.stats["hung_spared"] += 1
                    log.error("runtime %d (pid %s) hung too, %.0f s after the last hung runtime was killed: left "
                              "as it is (a flow may make an NF loop, and would hang each runtime that takes it; "
                              "see `nfactorctl flows` of runtime %d, then `nfactorctl runtime kill --id %d`)",
                              rt, e["pid"], now - self.last_hang_kill, rt, rt)
                continue
            self.kills[rt] = (e["pid"], now)
            self.last_hang_kill = now
            self.stats["hung_killed"] += 1
            log.warning("runtime %d (pid %s) hung: no heartbeat for %.2f s (hang timeout %.2f s); asking the "
                        "supervisor to kill it", rt, e["pid"], silent, self.hang_timeout)
            self.ep.send(self.supervisor_addr(rt), MsgType.RUNTIME_KILL,
                         {"id": rt, "pid": e["pid"], "why": f"hung: no heartbeat for {silent:.2f}s"})

    def consider_scale_out(self, now: float) -> None:
        running = [rt for rt, e in self.view.items() if e.get("state") == "running"]
        if not running or not self.max_runtimes:
            return
        loads = [self.live.get(rt, {}).get("load", {}).get("cpu", 0.0) for rt in running]
        avg = sum(loads) / len(loads)
        if avg < self.scale_threshold:
            self.overloaded_since = None
            return
        self.overloaded_since = self.overloaded_since or now
        if now - self.overloaded_since < self.scale_window or now - self.last_scale < self.scale_cooldown:
            return
        if len(self.view) >= self.max_runtimes:
            return
        self.last_scale = now
        self.overloaded_since = None
        self.stats["scale_outs"] += 1
        self.ep.send(self.supervisor_addr(), MsgType.RUNTIME_ADD, {"why": f"average CPU load {avg:.2f}"})

    def status(self) -> dict:
        return {"view": self.public_view(), "policy": self.policy.to_dict(),
                "stats": {**self.stats, **self.host_watch.stats},
                "rejected": dict(self.ep.rejected), "rejected_heartbeats": dict(self.hb.rejected),
                "log": self.log.stats(),
                "heartbeat": self.heartbeat, "miss_limit": self.miss_limit, "hang_timeout": self.hang_timeout,
                "pid": os.getpid()}

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.ep.fileno(), select.POLLIN)
        poller.register(self.hb.fileno(), select.POLLIN)
        tick = self.heartbeat / 2
        next_push = time.monotonic()
        while not self.stopping:
            poller.poll(int(tick * 1000))
            for msg, addr in self.ep.receive(256):
                self.on_message(msg, addr)
            while True:  # every heartbeat waiting, before the failure detector looks
                got = self.hb.receive(256)
                for msg, addr in got:
                    self.on_message(msg, addr)
                if len(got) < 256:
                    break
            now = time.monotonic()
            self.log.keep(now)  # (etcd: raises LeadershipLost once another may lead)
            self.detect_failures(now)
            self.consider_scale_out(now)
            self.consider_scale_in(now)
            self.finish_drains()
            if now >= next_push:
                # loads change all the time: runtimes pick migration targets from this
                self.push_view()
                next_push = now + LOAD_PUSH_INTERVAL
            self.ep.tick()

    def close(self) -> None:
        try:
            if self.recovered:
                self.log.compact(self.snapshot())
        except Exception:
            pass
        self.log.close()
        self.maps.close()
        self.ep.close()
        self.hb.close()


def _wire_addr(addr):
    """A peer's address as the view carries it (JSON and msgpack: a path, or [host, port])."""
    return addr if isinstance(addr, str) else list(addr)


def _peer_addr(addr):
    """What Endpoint.send takes, from a view entry's addr."""
    return addr if isinstance(addr, str) else tuple(addr)


def main(argv: list[str] | None = None) -> int:
    cfg, args = process_args("nfactor-controller", __doc__, argv, role="controller")
    logs.setup(args.role, **cfg.log_options(args.role))
    store = None
    if cfg.store == "etcd":
        # lead first: only the leader binds the control sockets and acts
        stopping = []
        stop_on_signals(lambda: stopping.append(True))
        try:
            store = EtcdStore(cfg.etcd_members, cfg.cluster_name, cfg.leader_ttl)
        except Exception as e:
            return _give_up(cfg, f"cannot use etcd: {type(e).__name__}: {e}")
        if not store.campaign(lambda: bool(stopping)):
            return 0
    try:
        ctl = Controller(cfg, store)
    except Exception as e:
        if store is not None:
            store.close()
        return _give_up(cfg, f"cannot start: {type(e).__name__}: {e}")
    stop_on_signals(lambda: setattr(ctl, "stopping", True))
    try:
        try:
            ctl.recover()
        except RecoveryError as e:
            return _give_up(cfg, str(e))
        except Exception as e:  # e.g. an unreadable log: the log is left as it is
            return _give_up(cfg, f"recovery failed: {type(e).__name__}: {e}")
        log.info("up on %s, %d runtimes in the view, %d ops replayed", ctl.ep.address,
                 len(ctl.view), ctl.stats["replayed_ops"])
        ctl.run()
    except StoreError as e:
        # etcd: leadership lost, or no member answers; the supervisor starts us again (we campaign)
        return _give_up(cfg, f"stepping down: {e}")
    finally:
        ctl.close()
    return 0


def _give_up(cfg: NodeConfig, why: str) -> int:
    log.error("%s", why)
    nodeconf.write_exit_reason(cfg.name, "controller", why)
    return 2


if __name__ == "__main__":
    sys.exit(main())
