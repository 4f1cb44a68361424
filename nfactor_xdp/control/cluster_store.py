"""The controller's state in etcd (`--store etcd`), and which controller leads.

The embedded SQLite log (durable_log.py) keeps the controller's state on its
own host: enough for one machine, lost with its disk, and only one
controller can use it.  With `--store etcd` the state lives in an etcd
cluster (Debian's etcd-server; three members survive the loss of one), and
several controllers may run: one leads, the others wait to take over.

Keys, under /nfactor/<node>/:
  leader   the leading controller's id (host:pid), attached to its lease
  state    the controller's state (the view, the policy, the view's version),
           JSON, rewritten on every change

Leadership.  A controller campaigns by creating `leader` with a lease of
`--leader-ttl` seconds, and only the winner binds the control sockets and
acts.  It refreshes the lease every third of its TTL; once a refresh fails
(the lease expired, or no member answers), it stops at once: another may
lead by then.  Every write is a transaction that succeeds only while
`leader` still holds this controller's lease, so a deposed leader that has
not noticed yet cannot overwrite its successor's state.  A clean stop
revokes the lease: the next leader starts without waiting for the TTL.

Ordering.  The new state is written before the switch's runtime table sees
it (Controller._change): a change that never reached etcd never reached the
switch, and a new leader re-applies the whole view to the switch anyway.

The client (etcd3gw, etcd's HTTP gateway) talks to one member at a time and
moves to the next endpoint when one does not answer.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import time

from .. import logs
from ..errors import NFactorError
from ..formats.config import parse_endpoint

log = logs.get("controller")

REQUEST_TIMEOUT = 0.5  # seconds per HTTP request to one member
RETRY_FOR = 3.0        # seconds a call goes round the members: longer than an election after a member's loss


class StoreError(NFactorError):
    """etcd cannot be used: no member answers, or leadership was lost."""


class LeadershipLost(StoreError):
    pass


class Members:
    """etcd3gw clients, one per endpoint; calls go to the current one and move
    on to the next when it does not answer."""

    def __init__(self, endpoints: list[str]):
        import etcd3gw  # only with --store etcd: the SQLite store needs nothing of it
        from etcd3gw import exceptions
        # a member that does not answer, or answers that it cannot now (no raft leader yet, ...):
        # the next one may; only a precondition failure is our own request's fault
        self.failures = (exceptions.Etcd3Exception,)
        self.errors = exceptions.PreconditionFailedError
        self.clients = [etcd3gw.client(host=h, port=p, timeout=REQUEST_TIMEOUT)
                        for h, p in map(parse_endpoint, endpoints)]
        self.endpoints = list(endpoints)
        self.current = 0
        self.switches = 0

    def call(self, fn, retry_for: float = RETRY_FOR):
        """fn(client), on the current member, then on the others in turn, round
        and round for up to `retry_for` seconds (a cluster that lost its raft
        leader answers errors until it has elected another)."""
        last, deadline, tries = None, time.monotonic() + retry_for, 0
        while True:
            at = (self.current + tries) % len(self.clients)
            tries += 1
            try:
                out = fn(self.clients[at])
            except self.errors as e:
                raise StoreError(f"etcd at {self.endpoints[at]}: {e.detail_text or e}") from None
            except self.failures as e:
                last = e
                if tries % len(self.clients) == 0:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)  # every member tried: give an election a moment
                continue
            if at != self.current:
                self.switches += 1
                log.warning("etcd: now talking to %s (%s did not answer)", self.endpoints[at],
                            self.endpoints[self.current])
                self.current = at
            return out
        raise StoreError(f"no etcd member answers ({', '.join(self.endpoints)}): {_why(last)}")


def _why(e) -> str:
    """An etcd3gw error in a few words (its text is requests' whole chain of causes)."""
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return m.group(1).strip() if m else ("timed out" if "imeout" in text else text[:160])


class _Lease:
    """A lease by its id: etcd3gw's Lease is tied to the client that made it,
    and a member that stops answering must not take the lease with it."""

    def __init__(self, lease_id: int):
        self.id = lease_id

    def refresh(self, c) -> int:
        r = c.post(c.get_url("/lease/keepalive"), json={"ID": self.id})
        return int((r.get("result") or {}).get("TTL", -1))

    def revoke(self, c) -> None:
        c.post(c.get_url("/kv/lease/revoke"), json={"ID": self.id})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdStore:
    """The controller's store in etcd; the same calls as durable_log.ControllerLog."""

    def __init__(self, endpoints: list[str], node: str, ttl: int = 2):
        self.members = Members(endpoints)
        self.prefix = f"/nfactor/{node}/"
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.ttl = ttl
        self.lease = None
        self.refreshed = 0.0
        self.seq = 0
        self.counts = {"writes": 0, "refreshes": 0, "write_ms_max": 0.0, "led_since": None}

    # --- leadership --------------------------------------------------------------
    def leader(self) -> str | None:
        got = self.members.call(lambda c: c.get(self.prefix + "leader"))
        return got[0].decode() if got else None

    def try_lead(self) -> bool:
        """One campaign attempt: True if this controller now leads."""
        lease = _Lease(self.members.call(lambda c: c.lease(self.ttl)).id)
        if self.members.call(lambda c: c.create(self.prefix + "leader", self.me, lease=lease)):
            self.lease, self.refreshed = lease, time.monotonic()
            self.counts["led_since"] = time.time()
            return True
        try:
            self.members.call(lease.revoke, retry_for=0)  # (one round: a lease gone is no error)
        except StoreError:
            pass
        return False

    def campaign(self, stopping=lambda: False, poll: float = 0.1) -> bool:
        """Wait until this controller leads (True) or `stopping()` (False).
        A member that does not answer is waited for too: without etcd no
        controller may act."""
        said = False
        while not stopping():
            try:
                if self.try_lead():
                    log.info("leading node's controllers as %s (lease %ds)", self.me, self.ttl)
                    return True
                if not said:
                    log.info("waiting to lead: %s leads", self.leader())
                    said = True
            except StoreError as e:
                log.warning("campaign: %s", e)
            time.sleep(poll)  # the leader's lease expires within ttl: polled, not watched
        return False

    def keep(self, now: float) -> None:
        """Refresh the lease every third of its TTL; raises LeadershipLost
        when it cannot be kept (expired, or no member answered in time)."""
        if self.lease is None or now - self.refreshed < self.ttl / 3:
            return
        try:
            ttl = self.members.call(self.lease.refresh, retry_for=self.ttl / 3)
        except StoreError as e:
            if time.monotonic() - self.refreshed < self.ttl:
                return  # try again next turn: the lease is still ours for a while
            raise LeadershipLost(f"lease not refreshed for {self.ttl}s: {e}") from None
        if ttl <= 0:
            raise LeadershipLost("the lease expired: another controller may lead now")
        self.refreshed = now
        self.counts["refreshes"] += 1

    # --- state ---------------------------------------------------------------------
    def _write(self, state: dict) -> None:
        if self.lease is None:
            raise LeadershipLost("not the leader")
        key = _b64(self.prefix + "leader")
        txn = {"compare": [{"key": key, "result": "EQUAL", "target": "LEASE", "lease": self.lease.id}],
               "success": [{"request_put": {"key": _b64(self.prefix + "state"),
                                            "value": _b64(json.dumps(state, separators=(",", ":")))}}],
               "failure": []}
        t0 = time.perf_counter()
        result = self.members.call(lambda c: c.transaction(txn))
        if not result.get("succeeded"):
            raise LeadershipLost("another controller leads: the state was not written")
        ms = (time.perf_counter() - t0) * 1e3
        self.counts["writes"] += 1
        self.counts["write_ms_max"] = max(self.counts["write_ms_max"], round(ms, 2))

    def intend(self, op: dict) -> int:
        self.seq += 1
        return self.seq

    def done(self, seq: int) -> None:
        pass

    def abandon(self, seq: int) -> None:
        pass

    def record(self, op: dict) -> int:
        return self.intend(op)

    def state_changed(self, snapshot) -> None:
        """After a change in memory, before the switch sees it."""
        self._write(snapshot())

    def compact(self, snapshot: dict) -> None:
        self._write(snapshot)

    def replay(self) -> tuple[dict | None, list, list]:
        """The state a previous leader left (None: a new node), nothing to replay."""
        got = self.members.call(lambda c: c.get(self.prefix + "state"))
        if not got:
            return None, [], []
        try:
            return json.loads(got[0]), [], []
        except ValueError as e:
            raise StoreError(f"the node's state in etcd is not JSON: {e}") from None

    def stats(self) -> dict:
        return {"store": "etcd", "endpoints": self.members.endpoints,
                "talking_to": self.members.endpoints[self.members.current], "member_switches": self.members.switches,
                "me": self.me, "leader_ttl": self.ttl, **self.counts}

    def close(self) -> None:
        """A clean stop: give leadership up at once (the lease's keys go with it)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                self.members.call(lease.revoke, retry_for=0)  # (one round: a lease gone is no error)
            except StoreError:
                pass


def forget(endpoints: list[str], node: str) -> None:
    """Delete the node's keys (a clean `down`, like removing its SQLite log)."""
    Members(endpoints).call(lambda c: c.delete_prefix(f"/nfactor/{node}/"))
