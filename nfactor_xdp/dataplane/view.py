"""The cluster view as this runtime last heard it from the controller (paper
3.1): every runtime's state, control address and load.  Migration picks its
targets, replication its replicas and recovery its peers from it."""
from __future__ import annotations

RUNNING, LEAVING, STARTING, FAILED = "running", "leaving", "starting", "failed"
ANY_STATE = (RUNNING, LEAVING, STARTING, FAILED)


class View:
    def __init__(self, me: int):
        self.me = me
        self.version: int | None = None
        self.entries: dict[int, dict] = {}
        self.listeners: list = []  # called after each update (replication follows its peers)

    def update(self, body: dict | None) -> None:
        """A VIEW message's body (or the view in the reply to REGISTER)."""
        body = body or {}
        entries = {}
        for e in body.get("runtimes") or []:
            if isinstance(e, dict) and isinstance(e.get("id"), int):
                entries[e["id"]] = e
        self.entries = entries
        self.version = body.get("version")
        for listener in self.listeners:
            listener()

    def state(self, rt_id: int) -> str | None:
        e = self.entries.get(rt_id)
        return e.get("state") if e else None

    @property
    def leaving(self) -> bool:
        """The controller marked this runtime leaving (scale-in): its flows go."""
        return self.state(self.me) == LEAVING

    def peers(self, states=(RUNNING,), exclude=()) -> list[dict]:
        """Other runtimes in one of `states` that have a control address."""
        return [e for i, e in sorted(self.entries.items())
                if i != self.me and e.get("state") in states and e.get("addr") and i not in exclude]

    def addr(self, rt_id: int, states=(RUNNING,)) -> str | tuple | None:
        """The control address of runtime rt_id if it is in one of `states`:
        what Endpoint.send takes (a socket path; [host, port] becomes a tuple)."""
        e = self.entries.get(rt_id)
        if e is None or rt_id == self.me or e.get("state") not in states or not e.get("addr"):
            return None
        return e["addr"] if isinstance(e["addr"], str) else tuple(e["addr"])

    @staticmethod
    def cpu(entry: dict, default: float) -> float:
        return (entry.get("load") or {}).get("cpu", default)
