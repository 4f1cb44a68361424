"""Flow migration, the target's side (paper 5): a flow arriving here gets an
actor at once (pass 1), holds the flow's frames until the source's state
comes (pass 3), then replays them in order; if the source gives up, the held
frames go back to it, a message-sized page at a time.  Migrator (migration.py)
is the source's side and mixes this in: both share its flows, view, endpoint
and counters."""
from __future__ import annotations

import time

from ..errors import NFactorError
from ..formats.flowkey import KEY_SIZE

MAX_BUFFER = 20000     # frames a target holds per arriving flow; beyond, dropped and counted (buffer_overflow)
TAKE_BACK_BYTES = 40_000  # frames per message when a target hands its buffer back (control frames hold 60,000)
TAKE_BACK_KEEP = 5.0   # seconds a target keeps an aborted flow's frames for the source to take back
# seconds an arriving flow waits for its state: well over a source's whole retry budget (~6 s
# from create to state), after which the source has rolled back or died and nobody will send it
ARRIVAL_TIMEOUT = 15.0


class Incoming:
    """The migration state of a flow arriving here (target side): its frames
    are held until the source's state comes."""
    __slots__ = ("source", "buffer", "since")

    def __init__(self, source: str):
        self.source = source
        self.buffer: list[tuple[bytes, int, int]] = []
        self.since = time.monotonic()

    def describe(self) -> str:
        return "in"


class Arrivals:
    def on_create(self, msg, addr) -> None:
        if self.hooks.fire("ignore_create"):
            return
        b = msg.body
        try:
            key = bytes.fromhex(b["key"])
            chain, rule, orig_dir = int(b["chain"]), int(b["rule"]), int(b["orig_dir"])
            if len(key) != KEY_SIZE:
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
        actor.migration = self.arriving[key] = Incoming(msg.sender)
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
            self.arriving.pop(key, None)
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

    def expire_arrivals(self, now: float) -> None:
        """Arriving flows whose state never came (the source rolled back but
        its abort was lost, or it died) are let go after ARRIVAL_TIMEOUT,
        their held frames kept for a source that asks for them late; a frame
        of the flow that comes later starts it anew.  Counted (in_abandoned)."""
        while self.arriving:
            key, incoming = next(iter(self.arriving.items()))
            actor = self.flows.get(key)
            if actor is not None and actor.migration is incoming:
                if incoming.since + ARRIVAL_TIMEOUT > now:
                    return  # oldest first: the rest are younger
                self.flows.remove(key)
                self.stats["in_abandoned"] += 1
                self.returning[key] = (incoming.buffer, now + TAKE_BACK_KEEP)
            del self.arriving[key]

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
        try:
            self.complete(actor, msg.body["actor"], time.monotonic())
        except Exception as e:  # a peer's bad state must not crash us
            self.ep.reply(msg, addr, {"ok": False, "error": f"bad state: {e}"})
            return
        self.ep.reply(msg, addr, {"ok": True})

    def complete(self, actor, wire: dict, now: float) -> None:
        """An arriving flow's state is here (from its source, or from its last
        snapshot when the source died: takeover.py): install it, replay what
        arrived meanwhile, in order, then carry on as usual.  Raises on a bad
        state, leaving the flow arriving."""
        incoming = actor.migration
        actor.load_wire(wire, now)
        actor.migration = None
        self.arriving.pop(actor.key, None)
        for data, direction, l4 in incoming.buffer:
            frame = bytearray(data)
            if actor.on_packet(memoryview(frame)[self.skip:], direction, l4, now):
                if not self.transmit(frame):
                    self.stats["replay_tx_fail"] += 1
            self.stats["replayed"] += 1
        self.stats["in_completed"] += 1

    def arriving_from(self, key: bytes, source: str):
        """The actor of flow `key` if it is arriving here from `source` (a sender name, rtN)."""
        actor = self.flows.get(key)
        if actor is not None and isinstance(actor.migration, Incoming) and actor.migration.source == source:
            return actor
        return None

