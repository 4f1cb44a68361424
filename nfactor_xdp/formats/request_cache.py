"""Requests already seen, by (sender, request id): a retry or a replay of a
request acts once.  The first copy goes to the handler; a later one gets the
reply the handler gave (re-sent), or nothing while the handler has not
answered yet.  An entry lives while a copy of its frame could still pass the
timestamp check (its newest timestamp + the skew window), so the cache bounds
itself; MAX_ENTRIES caps it against a burst."""
from __future__ import annotations

import collections

MAX_ENTRIES = 100_000
IN_PROGRESS = object()


class RequestCache:
    def __init__(self, window_ms: int, max_entries: int = MAX_ENTRIES):
        self.window_ms = window_ms
        self.max_entries = max_entries
        # (sender, rid) -> [expiry in wall-clock ms, reply body or IN_PROGRESS]; oldest first
        self._entries: collections.OrderedDict[tuple[str, int], list] = collections.OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, sender: str, rid: int, ts_ms: int, now_ms: int):
        """None for a new request (now remembered as in progress); else what
        its earlier copy got: a reply body, or IN_PROGRESS."""
        self._expire(now_ms)
        key = (sender, rid)
        entry = self._entries.get(key)
        if entry is not None:
            # a retry carries a fresh timestamp: it can be replayed for longer
            entry[0] = max(entry[0], ts_ms + self.window_ms)
            self._entries.move_to_end(key)
            return entry[1]
        self._entries[key] = [ts_ms + self.window_ms, IN_PROGRESS]
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        return None

    def answered(self, sender: str, rid: int, body: dict) -> None:
        entry = self._entries.get((sender, rid))
        if entry is not None:
            entry[1] = body

    def _expire(self, now_ms: int) -> None:
        # roughly in expiry order (refreshed entries move to the end): stop at the first live one
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry[0] >= now_ms:
                break
            del self._entries[key]
