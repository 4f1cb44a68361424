"""Flow migration (paper 5): the three passes, driven by the source actor.

    source S                        target T                 switch agent
    1. MIGRATE_CREATE  ───────────► actor, buffering
    2. MIGRATE_MOVE  ─────────────────────────────────────► entry -> T, grace period,
                                                             marker into S's port
       ... frames of the flow keep coming to S, then the marker
    3. MIGRATE_STATE (the actor) ─► replay buffer, go on
       release the actor

Every request has a timeout and retries (messages.Endpoint).  A marker that
does not come back in time is asked for again (the MOVE is idempotent).  A
failure before the move leaves the flow where it was; after it, the switch
entry is rolled back to S and S takes back what T buffered.
"""
from __future__ import annotations

import time

from ..errors import NFactorError
from ..formats import marker
from ..formats.messages import MessageError, MsgType

MARKER_TIMEOUT = 0.3   # seconds to wait for the marker before asking for it again
MARKER_RESENDS = 5
MAX_BUFFER = 20000     # frames a target holds per arriving flow; beyond, dropped and counted (buffer_overflow)
TAKE_BACK_BYTES = 40_000  # frames per message when a target hands its buffer back (control frames hold 60,000)
TAKE_BACK_KEEP = 5.0   # seconds a target keeps an aborted flow's frames for the source to take back
RECENT_MARKERS = 5.0   # seconds a finished migration's marker is still recognised


class MigrationError(NFactorError, ValueError):
    pass


class Outgoing:
    """The migration state of a flow leaving this runtime (source side)."""
    __slots__ = ("key", "target", "nonce", "payload", "step", "started", "deadline", "resends", "batch",
                 "marker_seen")

    def __init__(self, key: bytes, target: int, batch: int):
        self.key, self.target, self.batch = key, target, batch
        self.nonce = marker.new_nonce()
        self.payload = marker.payload(self.nonce)
        self.step = "create"     # create -> move -> marker -> state
        self.started = time.monotonic()
        self.deadline = 0.0
        self.resends = 0
        self.marker_seen = False

    def describe(self) -> str:
        return f"out to {self.target}"


class Incoming:
    """The migration state of a flow arriving here (target side): its frames
    are held until the source's state comes."""
    __slots__ = ("source", "buffer")

    def __init__(self, source: str):
        self.source = source
        self.buffer: list[tuple[bytes, int, int]] = []

    def describe(self) -> str:
        return "in"


class Batch:
    """One `nfactorctl migrate` request: how its flows fared."""

    def __init__(self, bid: int, target: int, keys: list[bytes]):
        self.id, self.target = bid, target
        self.total = len(keys)
        self.waiting = list(keys)       # not started yet (concurrency cap)
        self.succeeded = self.failed = self.retried = 0
        self.durations: list[float] = []
        self.started = time.monotonic()
        self.finished: float | None = None

    def report(self) -> dict:
        """seconds: the whole batch, from the request to its last flow done
        (queueing behind the concurrency cap included); batch_us_per_flow:
        that time over the batch's flows; flow_latency_us: each migrated
        flow's own migration, from its first message to its completion
        (queueing excluded, failed flows not counted)."""
        done = self.succeeded + self.failed
        seconds = (self.finished or time.monotonic()) - self.started
        lat = sorted(self.durations)
        latency = {}
        if lat:
            latency = {"avg": round(sum(lat) / len(lat) * 1e6, 1), "p50": round(lat[len(lat) // 2] * 1e6, 1),
                       "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, 1),
                       "max": round(lat[-1] * 1e6, 1), "flows": len(lat)}
        return {"batch": self.id, "to": self.target, "total": self.total, "succeeded": self.succeeded,
                "failed": self.failed, "retried": self.retried, "in_progress": self.total - done,
                "done": done == self.total, "seconds": round(seconds, 6),
                "batch_us_per_flow": round(seconds * 1e6 / self.total, 1) if self.total else None,
                "flow_latency_us": latency}


class Migrator:
    """The migration side of one runtime: its outgoing flows (it is the
    source) and the messages it answers as a target.

    flows: the runtime's FlowTable; view: its View; make_actor(key, orig_dir,
    chain, rule): a fresh actor for this runtime; transmit(frame): send a
    frame that is not in the UMEM; on_left(actor): a flow has left for good
    (replication forgets it); hooks: the runtime's TestHooks.  The control
    channel comes with `attach` once the runtime has one."""

    def __init__(self, flows, view, *, make_actor, transmit, on_left, hooks, max_concurrent: int):
        self.flows, self.view = flows, view
        self.make_actor, self.transmit, self.on_left, self.hooks = make_actor, transmit, on_left, hooks
        self.max_concurrent = max_concurrent
        self.ep = None
        self.switch_agent: tuple | None = None
        self.out: dict[bytes, Outgoing] = {}
        self.batches: dict[int, Batch] = {}
        self.next_batch = 1
        self.recent: dict[bytes, float] = {}  # marker payloads of finished migrations -> expiry
        self.left: dict[bytes, tuple[float, int]] = {}  # keys of flows that migrated away -> (expiry, target)
        self.returning: dict[bytes, tuple[list, float]] = {}  # aborted arrivals: key -> (frames, expiry)
        self.last_error = ""
        self.stats = {"late_markers": 0, "out_started": 0, "out_succeeded": 0, "out_failed": 0, "marker_resends": 0,
                      "in_created": 0, "in_completed": 0, "in_refused": 0, "in_aborted": 0, "replayed": 0,
                      "replay_tx_fail": 0, "buffered": 0, "buffer_overflow": 0, "markers_consumed": 0, "taken_back": 0,
                      "after_marker": 0, "after_marker_dropped": 0}

    def attach(self, ep, switch_agent: tuple | None) -> None:
        """The runtime's control endpoint and the switch agent's address."""
        self.ep, self.switch_agent = ep, switch_agent

    # --- source side -----------------------------------------------------------
    def start_batch(self, target: int, keys: list[bytes]) -> Batch:
        if target == self.view.me:
            raise MigrationError("a flow cannot migrate to its own runtime")
        if self.view.addr(target) is None:
            raise MigrationError(f"runtime {target} is not running (or not in this runtime's view)")
        if self.switch_agent is None or self.ep is None:
            raise MigrationError("no switch agent configured")
        b = Batch(self.next_batch, target, [k for k in keys if k in self.flows])
        self.next_batch += 1
        self.batches[b.id] = b
        self.pump()
        if not b.total:
            b.finished = time.monotonic()
        return b

    def pump(self) -> None:
        """Start waiting migrations while under the concurrency cap."""
        for b in self.batches.values():
            while b.waiting and len(self.out) < self.max_concurrent:
                key = b.waiting.pop(0)
                actor = self.flows.get(key)
                if actor is None or actor.migration is not None:
                    self._finish(b, None, ok=False)
                    continue
                self._begin(b, key, actor)

    def _begin(self, b: Batch, key: bytes, actor) -> None:
        m = Outgoing(key, b.target, b.id)
        self.out[key] = m
        actor.migration = m
        self.flows.forget_fast(actor)  # its frames now take the slow path, which looks for the marker
        self.stats["out_started"] += 1
        self._create(m, actor, timeout=0.5)

    def _create(self, m: Outgoing, actor, timeout: float) -> None:
        body = {"key": m.key.hex(), "chain": actor.chain, "rule": actor.rule_id, "orig_dir": actor.orig_dir}
        self.ep.request(self.view.addr(m.target), MsgType.MIGRATE_CREATE, body,
                        lambda msg, m=m: self._created(m, msg), timeout=timeout, retries=3,
                        on_timeout=lambda rid, m=m: self._timed_out(m, "create", "target did not answer create"))

    def _current(self, m: Outgoing) -> bool:
        return self.out.get(m.key) is m

    def _created(self, m: Outgoing, msg) -> None:
        if not self._current(m) or m.step != "create":
            return  # a duplicate reply
        if self.hooks.fire("drop_reply_create"):
            m.resends += 1
            self._create(m, self.flows.get(m.key), timeout=0.2)
            return
        if not msg.body.get("ok"):
            self._fail(m, f"target refused: {msg.body.get('error')}")
            return
        m.step = "move"
        self._move(m)

    def _move(self, m: Outgoing) -> None:
        actor = self.flows.get(m.key)
        frame = marker.frame(m.key, actor.orig_dir, m.payload)
        body = {"key": m.key.hex(), "to": m.target, "from": self.view.me, "marker": frame.hex()}
        m.deadline = time.monotonic() + MARKER_TIMEOUT
        self.ep.request(self.switch_agent, MsgType.MIGRATE_MOVE, body,
                        lambda msg, m=m: self._moved(m, msg), timeout=0.3, retries=3,
                        on_timeout=lambda rid, m=m: self._timed_out(m, "move", "switch agent did not answer"))

    def _moved(self, m: Outgoing, msg) -> None:
        if not self._current(m):
            return
        if self.hooks.fire("drop_reply_move"):
            m.resends += 1
            self._move(m)
            return
        if msg.body.get("ok") or msg.body.get("moved"):
            # moved; if the marker could not be sent, the marker timer asks again
            if m.step == "move":
                m.step = "marker"
        else:
            self._rollback(m, f"switch agent refused: {msg.body.get('error')}")

    def on_frame(self, actor, frame, l4: int) -> bool:
        """A frame of a flow that is leaving.  True: it was the marker (or a
        re-sent copy of it), which is consumed here."""
        m = actor.migration
        if m.step != "create" and marker.is_marker(frame, l4, m.payload):
            self.stats["markers_consumed"] += 1
            if not m.marker_seen:
                m.marker_seen = True
                self._send_state(m, actor)
            return True
        if m.marker_seen:
            self.stats["after_marker"] += 1  # cannot happen by construction: counted to show it does not
        return False

    def _send_state(self, m: Outgoing, actor) -> None:
        target = self.view.addr(m.target)
        if target is None:
            self._rollback(m, f"runtime {m.target} left the view before it got the state")
            return
        m.step = "state"
        body = {"key": m.key.hex(), "actor": actor.to_wire(time.monotonic())}
        try:
            self.ep.request(target, MsgType.MIGRATE_STATE, body,
                            lambda msg, m=m: self._done(m, msg), timeout=0.2, retries=5,
                            on_timeout=lambda rid, m=m: self._timed_out(m, "state", "target did not take the state"))
        except MessageError as e:  # e.g. a state too big for one message: keep the flow here
            self._rollback(m, f"cannot send the state: {e}")

    def late_marker(self, frame) -> bool:
        """A re-sent marker that arrives after its migration ended: drop it
        rather than take it for the first frame of a new flow."""
        if not self.recent or len(frame) < marker.PAYLOAD_SIZE:
            return False
        if bytes(frame[-marker.PAYLOAD_SIZE:]) in self.recent:
            self.stats["late_markers"] += 1
            return True
        return False

    def _remember(self, m: Outgoing) -> None:
        now = time.monotonic()
        self.recent = {p: t for p, t in self.recent.items() if t > now}
        self.recent[m.payload] = now + RECENT_MARKERS
        while self.left:  # in expiry order: stop at the first one still fresh
            key = next(iter(self.left))
            if self.left[key][0] > now:
                break
            del self.left[key]

    def left_here(self, key: bytes) -> bool:
        """A frame of flow `key`, which has no actor here.  True if the flow
        migrated away from here in the last RECENT_MARKERS seconds: the frame
        came behind its marker (counted in after_marker) and the caller drops
        it, rather than start the flow anew here with fresh NF state while
        its actor lives on at the target.  By construction no frame that
        should be forwarded is dropped: from the move on the switch sends the
        flow to the target, and points it back here only for a migration back
        (which begins with MIGRATE_CREATE here: on_create forgets the key), a
        rollback (only while the actor is still here), or a new placement
        once the target's slot is emptied for good (the target is then out
        of the view: forgotten below).  Not covered: the switch's LRU table
        evicting the entry, when full, within those seconds."""
        gone = self.left.get(key)
        if gone is None:
            return False
        if gone[0] < time.monotonic() or self.view.addr(gone[1]) is None:
            del self.left[key]
            return False
        self.stats["after_marker"] += 1
        self.stats["after_marker_dropped"] += 1
        return True

    def _done(self, m: Outgoing, msg) -> None:
        if not self._current(m):
            return
        if self.hooks.fire("drop_reply_state"):
            m.resends += 1
            self._send_state(m, self.flows.get(m.key))
            return
        if not msg.body.get("ok"):
            self._fail(m, f"target refused the state: {msg.body.get('error')}")
            return
        self._remember(m)
        self.left.pop(m.key, None)  # re-inserted last: the dict stays in expiry order
        self.left[m.key] = (time.monotonic() + RECENT_MARKERS, m.target)
        actor = self.flows.remove(m.key)
        if actor is not None:
            self.on_left(actor)  # the target's actor replicates from now on
        self.out.pop(m.key, None)
        self.stats["out_succeeded"] += 1
        self._finish(self.batches.get(m.batch), m, ok=True)

    def _timed_out(self, m: Outgoing, step: str, why: str) -> None:
        """A request of step `step` got no answer after its retries.  Only acts
        if the migration is still at that step: a MOVE whose replies were lost
        but whose marker came has moved on, and must not be rolled back."""
        if not self._current(m) or m.step != step and not (step == "move" and m.step == "marker"):
            return
        if step == "create":
            self._fail(m, why)
            peer = self.view.addr(m.target)  # it may have created the actor: let it go
            if peer is not None:
                self.ep.send(peer, MsgType.MIGRATE_DONE, {"key": m.key.hex(), "abort": True})
        else:
            self._rollback(m, why)

    def _rollback(self, m: Outgoing, why: str) -> None:
        """The switch may point at the target: point it back (no marker
        needed), and take back what the target buffered meanwhile."""
        if self.switch_agent is not None:
            body = {"key": m.key.hex(), "to": self.view.me, "from": m.target, "marker": None}
            self.ep.request(self.switch_agent, MsgType.MIGRATE_MOVE, body,
                            lambda msg, m=m: self._abort_target(m), timeout=0.3, retries=5)
        self._fail(m, why)

    def _abort_target(self, m: Outgoing, start: int = 0) -> None:
        peer = self.view.addr(m.target)
        if peer is not None:
            self.ep.request(peer, MsgType.MIGRATE_DONE, {"key": m.key.hex(), "abort": True, "from": start},
                            lambda msg, m=m: self._take_back(m, msg), timeout=0.2, retries=3)

    def _take_back(self, m: Outgoing, msg) -> None:
        """Frames the target held for an aborted migration, a message-sized
        page at a time: process them here (after a rollback they may come
        after newer frames: no loss, but order is only kept on the
        migration's normal path)."""
        actor = self.flows.get(m.key)
        now = time.monotonic()
        for data, direction, l4 in msg.body.get("frames", []):
            frame = bytearray(data)
            self.stats["taken_back"] += 1
            if actor is not None and actor.on_packet(memoryview(frame), direction, l4, now) \
                    and not self.transmit(frame):
                self.stats["replay_tx_fail"] += 1
        if isinstance(msg.body.get("next"), int):
            self._abort_target(m, msg.body["next"])

    def _fail(self, m: Outgoing, why: str) -> None:
        if not self._current(m):
            return  # finished already: count each flow once
        self._remember(m)
        actor = self.flows.get(m.key)
        if actor is not None and actor.migration is m:
            actor.migration = None  # the flow stays here with its state intact
        self.out.pop(m.key, None)
        self.stats["out_failed"] += 1
        self.last_error = why
        self._finish(self.batches.get(m.batch), m, ok=False)

    def _finish(self, b: Batch | None, m: Outgoing | None, ok: bool) -> None:
        if b is None:
            return
        if ok:
            b.succeeded += 1
            b.durations.append(time.monotonic() - m.started)
        else:
            b.failed += 1
        if m is not None and m.resends:
            b.retried += 1
        if b.succeeded + b.failed == b.total:
            b.finished = time.monotonic()
        self.pump()

    def tick(self, now: float) -> None:
        """Ask again for markers that are late (they travel the data plane and can be dropped)."""
        for m in list(self.out.values()):
            if m.step == "marker" and now > m.deadline:
                if m.resends >= MARKER_RESENDS:
                    self._rollback(m, "marker never arrived")
                    continue
                m.resends += 1
                self.stats["marker_resends"] += 1
                m.step = "move"
                self._move(m)

    # --- target side -------------------------------------------------------------
    def on_create(self, msg, addr) -> None:
        if self.hooks.fire("ignore_create"):
            return
        b = msg.body
        try:
            key = bytes.fromhex(b["key"])
            chain, rule, orig_dir = int(b["chain"]), int(b["rule"]), int(b["orig_dir"])
            if len(key) != 40:
                raise ValueError("bad key")
            existing = self.flows.get(key)
            if existing is not None:
                if isinstance(existing.migration, Incoming):
                    self.ep.reply(msg, addr, {"ok": True})  # a retry
                    return
                raise ValueError("this runtime already has the flow")
            if self.view.leaving:
                raise ValueError("runtime is leaving")
            actor = self.make_actor(key, orig_dir, chain, rule)
        except (KeyError, ValueError, TypeError, NFactorError) as e:
            self.stats["in_refused"] += 1
            self.ep.reply(msg, addr, {"ok": False, "error": str(e)})
            return
        actor.migration = Incoming(msg.sender)
        self.left.pop(key, None)  # the flow comes back: its frames are no longer late ones
        self.flows.add(actor)
        self.stats["in_created"] += 1
        self.ep.reply(msg, addr, {"ok": True})

    def on_abort(self, msg, addr) -> None:
        """The source gave up: forget the flow and hand back what was
        buffered, a page per request (`from`: the first frame wanted)."""
        try:
            key = bytes.fromhex(msg.body["key"])
            start = int(msg.body.get("from") or 0)
        except (KeyError, ValueError, TypeError):
            self.ep.reply(msg, addr, {"ok": False, "error": "bad key"})
            return
        now = time.monotonic()
        self.returning = {k: v for k, v in self.returning.items() if v[1] > now}
        actor = self.flows.get(key)
        if actor is not None and isinstance(actor.migration, Incoming):
            self.flows.remove(key)
            self.stats["in_aborted"] += 1
            self.returning[key] = (actor.migration.buffer, now + TAKE_BACK_KEEP)
        held = self.returning.get(key, ([], 0))[0]
        page, room, i = [], TAKE_BACK_BYTES, start
        while i < len(held) and (not page or room >= len(held[i][0]) + 16):
            data, direction, l4 = held[i]
            page.append([data, direction, l4])
            room -= len(data) + 16
            i += 1
        more = i < len(held)
        if not more:
            self.returning.pop(key, None)
        self.ep.reply(msg, addr, {"ok": True, "frames": page, "next": i if more else None})

    def buffer(self, actor, frame, direction: int, l4: int) -> None:
        held = actor.migration.buffer
        if len(held) >= MAX_BUFFER:
            self.stats["buffer_overflow"] += 1
            return
        held.append((bytes(frame), direction, l4))
        self.stats["buffered"] += 1

    def on_state(self, msg, addr) -> None:
        try:
            key = bytes.fromhex(msg.body["key"])
            actor = self.flows.get(key)
            if actor is None:
                raise KeyError(key)
        except (KeyError, ValueError, TypeError):
            self.ep.reply(msg, addr, {"ok": False, "error": "no such incoming flow"})
            return
        incoming = actor.migration
        if not isinstance(incoming, Incoming):
            self.ep.reply(msg, addr, {"ok": True})  # a retry: done already
            return
        now = time.monotonic()
        try:
            actor.load_wire(msg.body["actor"], now)
        except Exception as e:  # a peer's bad state must not crash us
            self.ep.reply(msg, addr, {"ok": False, "error": f"bad state: {e}"})
            return
        actor.migration = None
        # replay what arrived meanwhile, in order, then carry on as usual
        for data, direction, l4 in incoming.buffer:
            frame = bytearray(data)
            if actor.on_packet(memoryview(frame), direction, l4, now):
                if not self.transmit(frame):
                    self.stats["replay_tx_fail"] += 1
            self.stats["replayed"] += 1
        self.stats["in_completed"] += 1
        self.ep.reply(msg, addr, {"ok": True})

    def status(self) -> dict:
        return {**self.stats, "in_progress": len(self.out)}
