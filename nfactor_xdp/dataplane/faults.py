"""Failure injection for tests: the one hook through which a test makes a
runtime misbehave on purpose (lose a reply, ignore a request).  Armed over
the runtime's query socket (`inject_faults` op, root only); production code
asks `fire(name)` at the few places a fault can be injected, and nothing
fires unless a test armed it."""
from __future__ import annotations

FAULTS = {
    "drop_reply_create": "lose the target's answer to MIGRATE_CREATE (source side)",
    "drop_reply_move": "lose the switch agent's answer to MIGRATE_MOVE (source side)",
    "drop_reply_state": "lose the target's answer to MIGRATE_STATE (source side)",
    "ignore_create": "do not answer MIGRATE_CREATE at all (target side)",
}


class FaultHooks:
    def __init__(self):
        self.armed = dict.fromkeys(FAULTS, 0)
        self.fired = 0

    def arm(self, **counts: int) -> dict:
        """Make the next `count` occurrences of each named fault happen."""
        for name, count in counts.items():
            if name not in FAULTS:
                raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name}: a count >= 0")
            self.armed[name] = count
        return dict(self.armed)

    def fire(self, name: str) -> bool:
        """True if fault `name` is armed (and uses one of its occurrences)."""
        if self.armed[name] > 0:
            self.armed[name] -= 1
            self.fired += 1
            return True
        return False
