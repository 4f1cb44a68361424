"""The switch agent: moves a flow from one runtime to another for flow
migration (paper section 5) and injects the migration marker; it also points
a crashed runtime's flows at the peers that took them over (FLOW_TAKE).

    python -m nfactor_xdp.control.switch_agent --config-json CONFIG

It runs in the node's network namespace, its control socket in the node's
run directory (nodeconf.control_socket(name, "switch")).  The source runtime S asks it to
move a flow to the target T (MIGRATE_MOVE).  The agent

1. rewrites the flow's entry in the pinned `flows` map: new frames go to T;
2. waits for a grace period, so every frame of the flow the XDP switch looked
   up *before* the update has reached S's port;
3. sends the marker frame S gave it (the flow's own headers, payload
   `marker_payload(nonce)`) into S's path, behind all of those frames.
S forwards nothing of the flow after the marker; T buffers meanwhile.

Why the marker is behind every old frame, by construction:
- The switch redirects S's frames to `sw-rtS` through a devmap.  A NAPI poll
  queues its redirects and flushes them into the peer `rtS`'s receive ring at
  its end, all inside an RCU read-side section (BH disabled).
- `membarrier(MEMBARRIER_CMD_GLOBAL)` runs `synchronize_rcu()`: it returns
  only after every NAPI poll running at the time of the map update finished,
  so its frames are in the ring.  (With one online CPU the kernel skips it:
  no poll can be half done while this process runs.)
- The marker is then sent with an AF_PACKET socket on `sw-rtS`.  `veth_xmit`
  puts it into the same ring: every veth of the node has one queue, and
  because `rtS` has an XDP program (NAPI), veth turns TSO off on `sw-rtS`,
  which makes veth_xmit use the NAPI ring rather than the backlog.  The
  AF_XDP socket of S reads that ring in order.

Moves waiting together are batched: all map updates, one grace period (about
8 ms on the test machine), then all markers, then the replies.  A repeated
request is idempotent (re-applied, marker re-sent): that is how a runtime
re-sends a lost marker.
"""
from __future__ import annotations

import collections
import errno
import os
import select
import socket
import sys
from dataclasses import dataclass

from .. import logs
from ..formats.config import process_args, stop_on_signals
from ..kern import layouts as L
from ..formats import config as nodeconf
from ..dataplane import packet
from ..formats import fabric, flowkey, marker as marker_fmt
from ..kern import grace
from ..kern.bpfsys import BPF_EXIST, BpfError
from ..kern.maps import NodeMaps
from ..formats.messages import ClusterKey, Endpoint, Message, MsgType
from ..errors import NFactorError

MAX_RUNTIMES = L.C["NFX_MAX_RUNTIMES"]
MAX_BATCH = 1024                    # moves per grace period, bounds a reply's wait
# Runtimes read every frame behind the switch's ingress tag (nfactor_shared.h);
# a marker is consumed by the runtime, never sent on, so the port bit is moot.
MARKER_TAG = bytes([L.C["NFX_INGRESS_TAG"]])

log = logs.get("switch-agent")


# --- marker injection --------------------------------------------------------------

class MarkerInjector:
    """Sends frames out of a switch-side port with one AF_PACKET socket per
    interface, opened on first use and reopened when a send fails (the
    interface was re-created: the old socket is bound to a dead ifindex)."""

    SEND_TIMEOUT = 0.1  # a full ring must not stall the agent for long

    def __init__(self):
        self.socks: dict[str, socket.socket] = {}
        self.reopens = 0

    def _open(self, ifname: str) -> socket.socket:
        # protocol 0: the socket only sends, so it never queues received frames
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            s.settimeout(self.SEND_TIMEOUT)
            s.bind((ifname, 0))
        except BaseException:
            s.close()
            raise
        return s

    def send(self, ifname: str, frame: bytes) -> None:
        """Send `frame` on `ifname`; raises OSError if it cannot be sent."""
        for attempt in range(2):
            try:
                s = self.socks.get(ifname)
                if s is None:
                    s = self.socks[ifname] = self._open(ifname)
                s.send(frame)
                return
            except OSError:
                self.drop(ifname)
                if attempt:
                    raise
                self.reopens += 1

    def drop(self, ifname: str) -> None:
        s = self.socks.pop(ifname, None)
        if s is not None:
            s.close()

    def close(self) -> None:
        for ifname in list(self.socks):
            self.drop(ifname)


# --- requests ----------------------------------------------------------------------

class MoveError(NFactorError, ValueError):
    """A request refused; `reason` names the counter it goes to."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Move:
    key: bytes
    to: int
    src: int
    marker: bytes | None


def _runtime_id(body: dict, name: str) -> int:
    v = body.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_RUNTIMES:
        raise MoveError("bad_runtime", f"{name!r} must be a runtime id 0..{MAX_RUNTIMES - 1}, not {v!r}")
    return v


def parse_move(body: dict) -> Move:
    """Validate a MIGRATE_MOVE body; raises MoveError."""
    try:
        key = bytes.fromhex(body["key"])
    except (KeyError, TypeError, ValueError):
        raise MoveError("bad_request", "'key' must be the hex of a canonical flow key") from None
    if len(key) != flowkey.KEY_SIZE:
        raise MoveError("bad_request", f"'key' has {len(key)} bytes, expected {flowkey.KEY_SIZE}")
    to, src = _runtime_id(body, "to"), _runtime_id(body, "from")
    marker = body.get("marker")
    if marker is not None:
        try:
            marker = bytes.fromhex(marker)
        except (TypeError, ValueError):
            raise MoveError("bad_marker", "'marker' must be the hex of a frame, or None") from None
        if len(marker) > marker_fmt.MAX_FRAME:
            raise MoveError("bad_marker", f"marker frame has {len(marker)} bytes, limit {marker_fmt.MAX_FRAME}")
        kind, mkey, _, _ = packet.classify(marker)
        # only a frame of this very flow may be injected into the runtime's path
        if kind != packet.FLOW or mkey != key:
            raise MoveError("bad_marker", "marker frame is not a frame of this flow")
    return Move(key, to, src, marker)


@dataclass
class Take:
    keys: list[bytes]
    src: int
    to: int


MAX_TAKE_KEYS = 512  # keys per FLOW_TAKE: a request stays well inside a control message


def parse_take(body: dict) -> Take:
    """Validate a FLOW_TAKE body; raises MoveError."""
    src, to = _runtime_id(body, "from"), _runtime_id(body, "to")
    if src == to:
        raise MoveError("bad_request", "'from' and 'to' are the same runtime")
    hexes = body.get("keys")
    if not isinstance(hexes, list) or len(hexes) > MAX_TAKE_KEYS:
        raise MoveError("bad_request", f"'keys' must be a list of at most {MAX_TAKE_KEYS} flow keys")
    keys = []
    for h in hexes:
        try:
            k = bytes.fromhex(h)
        except (TypeError, ValueError):
            raise MoveError("bad_request", "'keys' must hold hex canonical flow keys") from None
        if len(k) != flowkey.KEY_SIZE:
            raise MoveError("bad_request", f"a key has {len(k)} bytes, expected {flowkey.KEY_SIZE}")
        keys.append(k)
    return Take(keys, src, to)


# --- the agent ----------------------------------------------------------------------

class SwitchAgent:
    def __init__(self, node: str, key: bytes | None = None, path: str | None = None, fabric_port: str | None = None):
        self.node = node
        self.fabric_port = fabric_port  # a node with hosts: markers to remote runtimes go out here
        self.maps = NodeMaps(node)
        self.flows = self.maps["flows"]  # opened now: fail at start if the node has no pins
        if key is None:
            key = ClusterKey.load_or_create(nodeconf.cluster_key_path())
        self.ep = Endpoint(path or nodeconf.control_socket(node, "switch"), key, "switch")
        self.injector = MarkerInjector()
        self.slots = self._open_slots(node)
        self.stats = collections.Counter({n: 0 for n in (
            "moves", "taken", "batches", "markers_sent", "marker_errors", "membarriers",
            "ended_deleted", "ended_kept", "switch_sets", "membarrier_us_total", "membarrier_us_max", "grace_errors", "internal_errors")})
        self.rejected: collections.Counter = collections.Counter()
        self.set_stamps: dict[tuple, tuple] = {}  # (runtime|host, id) -> the newest SWITCH_SET applied
        self.stopping = False

    @staticmethod
    def _open_slots(node: str):
        """The offloads array, to tell an offloaded flow (None on pins without one)."""
        from ..kern.offloads import OffloadSlots
        try:
            return OffloadSlots(node)
        except OSError:
            return None

    def apply(self, mv: Move) -> None:
        """Point the flow's entry at mv.to, keeping its other fields."""
        k = L.FlowKeyStruct.from_buffer_copy(mv.key)
        rt = self.maps["runtimes"].get(mv.to)
        if mv.to != mv.src and (rt is None or rt.state != L.C["NFX_RT_RUNNING"]):
            # a dead or leaving target would swallow the flow's frames
            raise MoveError("target_not_running", f"runtime {mv.to} is not running")
        try:
            cur = self.flows.get(k)
            if cur is None:
                raise MoveError("no_such_flow", "no such flow")
            cur.runtime = mv.to
            # BPF_EXIST: never re-create an entry the switch evicted meanwhile
            self.flows.set(k, cur, BPF_EXIST)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                raise MoveError("no_such_flow", "no such flow") from None
            raise MoveError("map_error", f"flow table update failed: {e}") from None

    def take(self, tk: Take) -> tuple[list[int], dict[str, list[int]]]:
        """Point the entries of a dead runtime's flows at the runtime that
        took them over (dataplane/takeover.py).  No grace period and no
        marker: the old owner is a dead process, nothing of it can still be
        forwarding.  A flow is moved only if its entry still names the dead
        runtime (or already names the taker: a repeated request), and not
        while the switch forwards it from an active offload slot (it keeps
        flowing in XDP; the restarted runtime recovers it).  Returns the
        indices moved, and the others by reason."""
        running = L.C["NFX_RT_RUNNING"]
        src, to = self.maps["runtimes"].get(tk.src), self.maps["runtimes"].get(tk.to)
        if src is not None and src.state == running:
            raise MoveError("source_running", f"runtime {tk.src} is running: its flows are its own")
        if to is None or to.state != running:
            raise MoveError("target_not_running", f"runtime {tk.to} is not running")
        moved, kept = [], {"gone": [], "elsewhere": [], "offloaded": []}
        for i, key in enumerate(tk.keys):
            k = L.FlowKeyStruct.from_buffer_copy(key)
            cur = self.flows.get(k)
            if cur is None:
                kept["gone"].append(i)
            elif cur.runtime == tk.to:
                moved.append(i)
            elif cur.runtime != tk.src:
                kept["elsewhere"].append(i)
            elif cur.offload and self._offload_active(cur.offload - 1, tk.src):
                kept["offloaded"].append(i)
            else:
                cur.runtime, cur.offload = tk.to, 0
                try:
                    self.flows.set(k, cur, BPF_EXIST)
                    moved.append(i)
                except BpfError as e:
                    if e.errno != errno.ENOENT:
                        raise MoveError("map_error", f"flow table update failed: {e}") from None
                    kept["gone"].append(i)
        self.stats["taken"] += len(moved)
        return moved, {why: ids for why, ids in kept.items() if ids}

    def _offload_active(self, slot: int, owner: int) -> bool:
        if self.slots is None:
            return False
        try:
            return self.slots.action(slot) != 0 and self.slots.owner(slot) == owner
        except IndexError:
            return False

    def on_take(self, msg: Message, addr) -> None:
        try:
            moved, kept = self.take(parse_take(msg.body))
        except MoveError as e:
            self.rejected[e.reason] += 1
            self.ep.reply(msg, addr, {"ok": False, "error": str(e)})
            return
        self.ep.reply(msg, addr, {"ok": True, "moved": moved, "kept": kept})

    def move_batch(self, requests: list[tuple[Message, object]]) -> None:
        """Map updates for all, one grace period, all markers, then the replies."""
        moved = []
        for msg, addr in requests:
            try:
                mv = parse_move(msg.body)
                self.apply(mv)
            except MoveError as e:
                self.rejected[e.reason] += 1
                self.ep.reply(msg, addr, {"ok": False, "error": str(e)})
                continue
            moved.append((msg, addr, mv))
        if not moved:
            return
        self.stats["moves"] += len(moved)
        try:
            us = round(grace.wait() * 1e6)
        except grace.GracePeriodError as e:
            # moved, but no marker may go out unordered: the runtime retries
            self.stats["grace_errors"] += 1
            for msg, addr, _ in moved:
                self.ep.reply(msg, addr, {"ok": False, "error": str(e), "moved": True})
            return
        self.stats["batches"] += 1
        self.stats["membarriers"] += 1
        self.stats["membarrier_us_total"] += us
        self.stats["membarrier_us_max"] = max(self.stats["membarrier_us_max"], us)
        answers = []
        for msg, addr, mv in moved:
            body = {"ok": True, "grace_us": us, "batch": len(moved)}
            if mv.marker is not None:
                ifname = nodeconf.runtime_ports(mv.src)[0]
                try:
                    # in front, an ingress tag like every frame the switch sends a runtime
                    frame = MARKER_TAG + mv.marker
                    remote = self._remote(mv.src)
                    if remote is not None:  # behind the flow's frames on the fabric link (architecture.md)
                        ifname, frame = self.fabric_port, fabric.encap(*remote, mv.src, frame)
                    self.injector.send(ifname, frame)
                    self.stats["markers_sent"] += 1
                except OSError as e:
                    self.stats["marker_errors"] += 1
                    # the flow did move; re-sending the same request re-sends the marker
                    body = {"ok": False, "moved": True, "grace_us": us, "batch": len(moved),
                            "error": f"marker not sent on {ifname}: {e.strerror or e}"}
            answers.append((msg, addr, body))
        for msg, addr, body in answers:
            self.ep.reply(msg, addr, body)

    def _remote(self, rt: int):
        """For a runtime on another host: (this host, its host) as (IPv4, MAC)
        from the hosts map; None for a local one."""
        if self.fabric_port is None:
            return None
        entry = self.maps["runtimes"].get(rt)
        if entry is None or entry.host == 0:
            return None
        hosts = [self.maps["hosts"].get(h) for h in (0, entry.host)]
        if not all(h is not None and h.flags & L.C["NFX_HOST_KNOWN"] for h in hosts):
            raise OSError(errno.EHOSTUNREACH, f"host {entry.host} of runtime {rt} is not known")
        return tuple((socket.inet_ntoa(bytes(h.ipv4)), ":".join(f"{b:02x}" for b in h.mac)) for h in hosts)

    def on_set(self, msg: Message, addr) -> None:
        """A controller on a worker host (switch_tables.py) sets a runtime's
        state or a host's fence; a write older than the newest one applied to
        the same runtime or host is answered and ignored."""
        body = msg.body if isinstance(msg.body, dict) else {}
        if body.get("read"):
            self.ep.reply(msg, addr, {"ok": True, "hosts": {str(h): v for h, v in self.maps.host_table().items()}})
            return
        try:
            stamp = (int(body["epoch"]), int(body["seq"]))
            if "runtime" in body:
                rt, state, host = (int(v) for v in body["runtime"])
                if not (0 <= rt < MAX_RUNTIMES and state in L.RT_STATES and 0 <= host < L.C["NFX_MAX_HOSTS"]):
                    raise ValueError("no such runtime, state or host")
                what = ("runtime", rt)
            else:
                host, fenced = int(body["fence"][0]), bool(body["fence"][1])
                if not 0 < host < L.C["NFX_MAX_HOSTS"]:
                    raise ValueError("no such worker host")
                what = ("host", host)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            self.rejected["bad_set"] += 1
            self.ep.reply(msg, addr, {"ok": False, "error": f"bad SWITCH_SET: {e}"})
            return
        if stamp > self.set_stamps.get(what, (0, 0)):
            self.set_stamps[what] = stamp
            if what[0] == "runtime":
                self.maps.set_runtime_state(rt, state, host=host)
            else:
                self.maps.fence_host(host, fenced)
            self.stats["switch_sets"] += 1
        self.ep.reply(msg, addr, {"ok": True})

    def on_end(self, msg: Message) -> None:
        """A worker host's runtime ended these flows: their entries go if they
        still place the flow on it (no reply: a lost one leaves them to the LRU)."""
        body = msg.body if isinstance(msg.body, dict) else {}
        try:
            rt = _runtime_id(body, "runtime")
            keys = [bytes.fromhex(k) for k in body.get("keys") or []]
            if not all(len(k) == flowkey.KEY_SIZE for k in keys):
                raise MoveError("bad_key", "a key of the wrong size")
        except (MoveError, ValueError, TypeError):
            self.rejected["bad_end"] += 1
            return
        for key in keys:
            self.stats["ended_deleted" if self.maps.delete_flow(key, rt) else "ended_kept"] += 1

    def status(self) -> dict:
        return {"ok": True, "node": self.node, "pid": os.getpid(), "stats": dict(self.stats),
                "marker_socket_reopens": self.injector.reopens, "rejected": dict(self.rejected),
                "endpoint": {"rejected": dict(self.ep.rejected), "counters": dict(self.ep.counters)}}

    def on_message(self, msg: Message, addr) -> None:
        if msg.type == MsgType.STATUS:
            self.ep.reply(msg, addr, self.status())
        elif msg.type == MsgType.FLOW_TAKE:
            self.on_take(msg, addr)
        elif msg.type == MsgType.FLOW_END:
            self.on_end(msg)
        elif msg.type == MsgType.SWITCH_SET:
            self.on_set(msg, addr)
        elif msg.type == MsgType.PING:
            self.ep.reply(msg, addr, {"ok": True})
        else:
            self.rejected["unexpected_type"] += 1
            self.ep.reply(msg, addr, {"ok": False, "error": f"the switch agent does not handle {msg.type.name}"})

    def serve_once(self) -> int:
        """Handle every message waiting, the moves as one batch; returns how many moves."""
        moves = []
        while len(moves) < MAX_BATCH:
            got = self.ep.receive(256)
            if not got:
                break
            for msg, addr in got:
                if msg.type == MsgType.MIGRATE_MOVE:
                    moves.append((msg, addr))
                else:
                    self.on_message(msg, addr)
        if moves:
            self.move_batch(moves)
        return len(moves)

    def run(self, tick: float = 0.1) -> None:
        poller = select.poll()
        poller.register(self.ep.fileno(), select.POLLIN)
        while not self.stopping:
            poller.poll(int(tick * 1000))
            try:
                self.serve_once()
            except Exception:
                # a bug must not take migration down for the whole node
                self.stats["internal_errors"] += 1
                log.exception("internal error")

    def close(self) -> None:
        self.injector.close()
        if self.slots is not None:
            self.slots.close()
        self.ep.close()
        self.maps.close()


def main(argv: list[str] | None = None) -> int:
    cfg, _ = process_args("nfactor-switch-agent", __doc__, argv)
    logs.setup("switch-agent", **cfg.log_options("switch-agent"))
    try:
        grace.check()
    except grace.GracePeriodError as e:
        log.error("%s", e)
        return 1
    agent = SwitchAgent(cfg.name, path=nodeconf.control_address(cfg, "switch"),
                        fabric_port=cfg.fabric_port if cfg.hosts else None)
    stop_on_signals(lambda: setattr(agent, "stopping", True))
    try:
        log.info("up on %s", agent.ep.address)
        agent.run()
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
