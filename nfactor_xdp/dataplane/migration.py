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
from .arrivals import Arrivals
from .batches import Batch
from .histogram import MIGRATION_MS, Histogram
from .nf import MAX_STATE_BYTES
from .view import ANY_STATE

MARKER_TIMEOUT = 0.3   # seconds to wait for the marker before asking for it again
MARKER_RESENDS = 5
LEFT_KEEP = 5.0        # seconds a flow that left is remembered (its frames behind the marker are dropped)
KEEP_BATCHES = 64      # finished batches kept for their reports (migrate_status); older ones are pruned


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


class Migrator(Arrivals):
    """The migration side of one runtime: its outgoing flows (it is the
    source) and, through Arrivals, the messages it answers as a target.

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
        self.next_deadline = float("inf")  # no marker is due before (tick() runs every turn of the loop)
        self._pumping = False
        self.batches: dict[int, Batch] = {}
        self.next_batch = 1
        self.left: dict[bytes, tuple[float, int]] = {}  # keys of flows that migrated away -> (expiry, target)
        self.returning: dict[bytes, tuple[list, float]] = {}  # aborted arrivals: key -> (frames, expiry)
        self.arriving: dict[bytes, object] = {}  # key -> its Incoming, oldest first (abandoned ones expire)
        self.unmovable: set[bytes] = set()  # flows whose state was found too big to move
        self.queued: set[bytes] = set()     # keys waiting in a batch (never offloaded meanwhile)
        self.revoke = lambda keys: 0        # takes offloaded flows back from the switch (offloader.py)
        self.settle = lambda keys: None     # ... and makes their counts final before their state leaves
        # In the runtime's loop a marker is seen in the middle of a batch whose forwarded frames go
        # to TX only after it: the states wait for that (send_states), or the target could send a
        # frame of the flow before one still waiting here (runtime.py sets defer_states).
        self.defer_states = False
        self.states_due: list = []
        self.skip = 0  # held frames keep the switch's ingress tag in front; actors see them without (runtime.skip)
        self.last_error = ""
        self.stats = {"late_markers": 0, "out_started": 0, "out_succeeded": 0, "out_failed": 0, "marker_resends": 0,
                      "in_created": 0, "in_completed": 0, "in_refused": 0, "in_aborted": 0, "in_abandoned": 0,
                      "replayed": 0, "replay_tx_fail": 0, "buffered": 0, "buffer_overflow": 0, "markers_consumed": 0,
                      "taken_back": 0, "after_marker": 0, "after_marker_dropped": 0}
        self.flow_ms = Histogram(MIGRATION_MS)  # each migrated flow's own migration, as in its batch's report

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
        self.queued.update(b.waiting)
        self.revoke(b.waiting)  # one grace period for the batch: its flows' frames come here again
        self._prune()
        self.batches[b.id] = b
        self.pump()
        if not b.total:
            b.finished = time.monotonic()
        return b

    def _prune(self) -> None:
        """Forget finished batches but the newest KEEP_BATCHES (a drain or the
        load balancer starts one every heartbeat)."""
        done = [bid for bid, b in self.batches.items() if b.finished is not None]
        for bid in done[:max(0, len(done) - KEEP_BATCHES + 1)]:
            del self.batches[bid]

    def pump(self) -> None:
        """Start waiting migrations while under the concurrency cap.  Never
        re-entered (a flow that ends calls it): the flows that end while it
        starts others (every waiting flow, when the target has left the
        view) free their slots for this same call, not for a call per flow
        nested in it (a batch of thousands once overflowed the stack)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            progressed = True
            while progressed:
                progressed = False
                for b in list(self.batches.values()):
                    while b.waiting and len(self.out) < self.max_concurrent:
                        progressed = True
                        self._start_next(b)
        finally:
            self._pumping = False

    def _start_next(self, b: Batch) -> None:
        key = b.waiting.popleft()
        self.queued.discard(key)
        actor = self.flows.get(key)
        if actor is None or actor.migration is not None:
            self._finish(b, None, ok=False)
        elif self.view.addr(b.target) is None:  # the target left the view: nothing is sent to it
            self.last_error = f"runtime {b.target} left the view"
            self._finish(b, None, ok=False)
        elif not self._fits(actor):
            b.not_migratable.append(key)
            self._finish(b, None, ok=False)
        else:
            self._begin(b, key, actor)

    def _fits(self, actor) -> bool:
        """Can the flow's state travel in a control message?  Measured before
        anything is asked of the target or the switch; a flow that cannot is
        marked (actor.too_big, shown by `flows`) and stays here."""
        try:
            size = actor.state_bytes()
        except Exception as e:  # an NF that cannot serialize its state: that flow cannot move
            self.last_error = f"cannot serialize the state of a flow: {type(e).__name__}: {e}"
            actor.too_big = -1
            self._mark(actor)
            return False
        actor.too_big = size if size > MAX_STATE_BYTES else 0
        self._mark(actor)
        if actor.too_big:
            self.last_error = f"a flow's state takes {size} bytes encoded, more than a migration carries " \
                              f"({MAX_STATE_BYTES}): it stays here"
        return not actor.too_big

    def _mark(self, actor) -> None:
        if actor.too_big:
            self.unmovable.add(actor.key)
        else:
            self.unmovable.discard(actor.key)

    def not_migratable(self) -> int:
        """How many of the flows here were found too big to move (by their last attempt)."""
        for key in [k for k in self.unmovable if not getattr(self.flows.get(k), "too_big", 0)]:
            self.unmovable.discard(key)  # ended, or fits now
        return len(self.unmovable)

    def _begin(self, b: Batch, key: bytes, actor) -> None:
        m = Outgoing(key, b.target, b.id)
        self.out[key] = m
        actor.migration = m
        self.flows.forget_fast(actor)  # its frames now take the slow path, which looks for the marker
        self.stats["out_started"] += 1
        self._create(m, actor, timeout=0.5)

    def _create(self, m: Outgoing, actor, timeout: float) -> None:
        target = self.view.addr(m.target)
        if target is None or actor is None:  # (a retry) the target left the view: nothing has moved yet
            self._fail(m, f"runtime {m.target} left the view")
            return
        body = {"key": m.key.hex(), "chain": actor.chain, "rule": actor.rule_id, "orig_dir": actor.orig_dir}
        self.ep.request(target, MsgType.MIGRATE_CREATE, body,
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
        if actor is None:
            self._fail(m, "the flow's actor is gone")
            return
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
                self.next_deadline = min(self.next_deadline, m.deadline)
        else:
            self._rollback(m, f"switch agent refused: {msg.body.get('error')}")

    def on_frame(self, actor, frame, l4: int) -> bool:
        """A frame of a flow that is leaving.  True: it was the marker (or a
        re-sent copy of it), which is consumed here."""
        m = actor.migration
        if m.step != "create" and marker.carried(frame, l4, actor.proto) == m.payload:  # as late_marker sees it
            self.stats["markers_consumed"] += 1
            if not m.marker_seen:
                m.marker_seen = True
                if self.defer_states:
                    self.states_due.append((m, actor))
                else:
                    self._send_state(m, actor)
            return True
        if m.marker_seen:
            self.stats["after_marker"] += 1  # cannot happen by construction: counted to show it does not
        return False

    def send_states(self) -> None:
        """The states of the flows whose marker came, now that the frames the
        runtime forwarded before each marker have been handed to the kernel."""
        due, self.states_due = self.states_due, []
        for m, actor in due:
            if actor.migration is m and m.step != "state":
                self._send_state(m, actor)

    def _send_state(self, m: Outgoing, actor) -> None:
        target = self.view.addr(m.target)
        if target is None:
            self._rollback(m, f"runtime {m.target} left the view before it got the state")
            return
        m.step = "state"
        try:
            self.settle((m.key,))
            body = {"key": m.key.hex(), "actor": actor.to_wire(time.monotonic())}
            self.ep.request(target, MsgType.MIGRATE_STATE, body,
                            lambda msg, m=m: self._done(m, msg), timeout=0.2, retries=5,
                            on_timeout=lambda rid, m=m: self._timed_out(m, "state", "target did not take the state"))
        except Exception as e:  # a state grown too big for one message, an NF that cannot serialize: keep the flow
            if isinstance(e, MessageError) and e.reason == "oversized":
                actor.too_big = actor.state_bytes()
                self._mark(actor)
            self._rollback(m, f"cannot send the state: {type(e).__name__}: {e}")

    def late_marker(self, frame, l4: int, proto: int, actor) -> bool:
        """A marker that is not the one the flow's migration from here awaits
        (`actor`: the flow's, or None): a copy of an earlier one, re-sent or
        delayed, after any amount of time.  Dropped and counted (late_markers),
        never forwarded, buffered nor made a new flow: a marker never reaches
        an endpoint.  Known by its form (marker.carried), so nothing about
        finished migrations needs remembering."""
        payload = marker.carried(frame, l4, proto)
        if payload is None:
            return False
        m = actor.migration if actor is not None else None
        if isinstance(m, Outgoing) and m.step != "create" and payload == m.payload:
            return False  # the marker itself: on_frame consumes it
        self.stats["late_markers"] += 1
        return True

    def _forget_left(self) -> None:
        now = time.monotonic()
        while self.left:  # in expiry order: stop at the first one still fresh
            key = next(iter(self.left))
            if self.left[key][0] > now:
                break
            del self.left[key]

    def left_here(self, key: bytes) -> bool:
        """A frame of flow `key`, which has no actor here.  True if the flow
        migrated away from here in the last LEFT_KEEP seconds: the frame
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
        if not msg.body.get("ok"):  # e.g. a restarted target, which never heard of the flow
            self._rollback(m, f"target refused the state: {msg.body.get('error')}")
            return
        self._forget_left()
        self.left.pop(m.key, None)  # re-inserted last: the dict stays in expiry order
        self.left[m.key] = (time.monotonic() + LEFT_KEEP, m.target)
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
            peer = self.view.addr(m.target, ANY_STATE)  # it may have created the actor: let it go
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
        # Whatever the view says: a runtime marked failed may only have been starved of CPU
        # for a few heartbeats, and registers again with its actors (an abort to a dead one is lost)
        peer = self.view.addr(m.target, ANY_STATE)
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
            if actor is not None and actor.on_packet(memoryview(frame)[self.skip:], direction, l4, now) \
                    and not self.transmit(frame):
                self.stats["replay_tx_fail"] += 1
        if isinstance(msg.body.get("next"), int):
            self._abort_target(m, msg.body["next"])

    def _fail(self, m: Outgoing, why: str) -> None:
        if not self._current(m):
            return  # finished already: count each flow once
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
            b.durations.append(took := time.monotonic() - m.started)
            self.flow_ms.observe(took * 1e3)
        else:
            b.failed += 1
        if m is not None and m.resends:
            b.retried += 1
        if b.succeeded + b.failed == b.total:
            b.finished = time.monotonic()
        self.pump()

    def tick(self, now: float) -> None:
        """Ask again for markers that are late (they travel the data plane and
        can be dropped).  Scans the outgoing flows only when one may be late:
        with a thousand in flight, a scan every turn of the loop cost more
        than the frames it handled."""
        if now < self.next_deadline:
            return
        for m in list(self.out.values()):
            if m.step == "marker" and now > m.deadline:
                if m.resends >= MARKER_RESENDS:
                    self._rollback(m, "marker never arrived")
                    continue
                m.resends += 1
                self.stats["marker_resends"] += 1
                m.step = "move"
                self._move(m)
        self.next_deadline = min((m.deadline for m in self.out.values() if m.step == "marker"), default=float("inf"))

    def status(self) -> dict:
        return {**self.stats, "in_progress": len(self.out), "not_migratable": self.not_migratable(),
                "flow_ms": self.flow_ms.to_dict()}
