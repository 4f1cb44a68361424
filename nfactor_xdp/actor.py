"""One actor per flow (paper 3.3): the flow's execution context in a runtime.

It is created on the flow's first frame and owns everything the runtime
knows of the flow.  Packets are its main messages and are handled inline by
`on_packet` (a function call, as in the paper); other messages (migration,
replication, in later stages) go through `mailbox` and are handled by the
same event loop.
"""
from __future__ import annotations

from collections import deque

from .packet import describe_key


class Actor:
    __slots__ = ("key", "proto", "orig_dir", "packets", "bytes", "dropped", "first_seen", "last_seen",
                 "mailbox", "fast_keys")

    def __init__(self, key: bytes, orig_dir: int, now: float):
        self.key = key
        self.proto = key[36]
        self.dropped = 0
        self.fast_keys: list[bytes] = []  # the runtime's fast-path entries for this flow
        self.orig_dir = orig_dir       # direction of the first frame seen here
        self.packets = [0, 0]          # per direction (packet.LO_TO_HI, HI_TO_LO)
        self.bytes = [0, 0]
        self.first_seen = now
        self.last_seen = now
        self.mailbox: deque = deque()

    def on_packet(self, frame, direction: int, l4: int, now: float) -> bool:
        """Process one frame of the flow; True forwards it, False drops it."""
        self.packets[direction] += 1
        self.bytes[direction] += len(frame)
        self.last_seen = now
        return True

    def summary(self) -> dict:
        fwd = self.orig_dir
        return {
            "key": self.key.hex(),
            "flow": describe_key(self.key),
            "packets": {"orig": self.packets[fwd], "reply": self.packets[1 - fwd]},
            "bytes": {"orig": self.bytes[fwd], "reply": self.bytes[1 - fwd]},
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }
