"""A runtime's flows: one actor per canonical key, and the fast path that
finds the actor of a known IPv4 flow direction from the frame's raw address
and port bytes without parsing it.  Both change only here, together."""
from __future__ import annotations

from typing import Iterator

from .actor import Actor


class FlowTable:
    def __init__(self):
        self.actors: dict[bytes, Actor] = {}
        # raw IPv4 src+dst addresses and ports of one direction -> (actor, canonical direction)
        self.fast: dict[bytes, tuple[Actor, int]] = {}

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
        return actor

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
