"""A runtime's flows: one actor per canonical key, and the fast path that
finds the actor of a known IPv4 flow direction from the frame's raw address
and port bytes without parsing it.  Both change only here, together.

It also keeps the order in which flows are given up when the runtime is full
(`victim`): flows seen once, oldest first, then flows seen again in CLOCK
order.  So a flood of one-packet flows only ever displaces its own kind, and a
flow with traffic goes only when no such flow is left and it has been silent
for a whole turn of the clock."""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator

from .actor import Actor

LISTINGS = 8          # listings of the flows open at once (the `flows` query's cursors); the oldest goes first
LISTING_IDLE = 30.0   # seconds a listing waits for its next page

VICTIM_SCAN = 64  # flows passed over at most per victim: bounded work per new flow, whatever the table holds


class FlowTable:
    def __init__(self):
        self.actors: dict[bytes, Actor] = {}
        # raw IPv4 src+dst addresses and ports of one direction -> (actor, canonical direction)
        self.fast: dict[bytes, tuple[Actor, int]] = {}
        self.listings: dict[str, tuple[list[bytes], int, float]] = {}  # cursor -> (keys, next index, deadline)
        # Eviction order, by key (a key whose actor is gone is skipped when met):
        # flows not yet seen twice, in creation order, then the others.
        self.probation: deque[bytes] = deque()
        self.protected: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self.actors)

    def __contains__(self, key: bytes) -> bool:
        return key in self.actors

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.actors)

    def get(self, key: bytes) -> Actor | None:
        return self.actors.get(key)

    def values(self):
        return self.actors.values()

    def items(self):
        return self.actors.items()

    def add(self, actor: Actor) -> Actor:
        self.actors[actor.key] = actor
        actor.clock = actor.last_seen
        self.probation.append(actor.key)
        return actor

    def victim(self, scan: int = VICTIM_SCAN) -> Actor | None:
        """The flow to give up for a new one: the oldest flow seen only once,
        else one not seen since the clock hand last passed it (its second
        chance).  Flows migrating are passed over.  Passing over a flow
        counts against `scan`; if that runs out, the idlest flow passed over,
        None if all of them were migrating.  Keys of flows gone, and flows
        promoted, are met once each: O(1) amortized per new flow."""
        actors, probation, protected = self.actors, self.probation, self.protected
        fallback = None
        while probation and scan > 0:
            key = probation.popleft()
            a = actors.get(key)
            if a is None:
                continue
            if a.migration is not None:
                scan -= 1
                probation.append(key)
            elif a.packets[0] + a.packets[1] > 1:
                a.clock = a.last_seen  # seen again: promoted (lazily, here, not on the packet path)
                protected.append(key)
            else:
                return a
        while protected and scan > 0:
            key = protected.popleft()
            a = actors.get(key)
            if a is None:
                continue
            if a.migration is None and a.last_seen <= a.clock:
                return a
            scan -= 1
            protected.append(key)
            if a.migration is None:
                a.clock = a.last_seen  # seen since the hand last passed: spared this turn
                if fallback is None or a.last_seen < fallback.last_seen:
                    fallback = a
        return fallback

    def compact(self) -> None:
        """Drop the keys of flows that are gone from the eviction order (only
        when they outnumber the live ones: O(1) amortized per flow)."""
        if len(self.probation) + len(self.protected) > 2 * len(self.actors) + 1024:
            actors = self.actors
            self.probation = deque(k for k in self.probation if k in actors)
            self.protected = deque(k for k in self.protected if k in actors)

    def remove(self, key: bytes) -> Actor | None:
        """Forget a flow (its actor and its fast-path entries); returns the actor."""
        actor = self.actors.pop(key, None)
        if actor is not None:
            self.forget_fast(actor)
        return actor

    def learn_fast(self, raw: bytes, actor: Actor, direction: int) -> None:
        if raw not in self.fast:
            self.fast[raw] = (actor, direction)
            actor.fast_keys.append(raw)

    def forget_fast(self, actor: Actor) -> None:
        """The flow's frames take the full parser again (e.g. while it migrates)."""
        for raw in actor.fast_keys:
            self.fast.pop(raw, None)
        actor.fast_keys = []

    def page(self, cursor: str | None, limit: int, now: float) -> tuple[list[Actor], str | None, int]:
        """A page of a listing of the flows: (up to `limit` actors, the cursor
        of the next page or None, flows in the listing).  The first page
        (cursor None) takes the keys as they are then, a copy made in C (~1 ms
        per 100,000 flows); each page then costs `limit` lookups.  A flow gone
        since is skipped and one added since is not listed: every flow of the
        listing comes once.  KeyError: no such cursor (it expired)."""
        self.listings = {c: v for c, v in self.listings.items() if v[2] > now}
        if cursor is None:
            keys, at = list(self.actors), 0
        else:
            keys, at, _ = self.listings.pop(cursor)
        out = []
        while at < len(keys) and len(out) < limit:
            actor = self.actors.get(keys[at])
            at += 1
            if actor is not None:
                out.append(actor)
        if at >= len(keys):
            return out, None, len(keys)
        while len(self.listings) >= LISTINGS:
            del self.listings[next(iter(self.listings))]
        cursor = os.urandom(8).hex()
        self.listings[cursor] = (keys, at, now + LISTING_IDLE)
        return out, cursor, len(keys)
