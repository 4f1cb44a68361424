"""A restarted runtime fetches its snapshots from a peer a page at a time
(dataplane/replication.py on_fetch): every snapshot once, in key order, pages
within the message budget, each page found without sorting the store again,
and snapshots that ended meanwhile skipped."""
from __future__ import annotations

from types import SimpleNamespace

from nfactor_xdp.dataplane import replication
from nfactor_xdp.dataplane.replication import MESSAGE_BUDGET, Replicator


class Replies:
    def __init__(self):
        self.bodies = []

    def reply(self, msg, addr, body):
        self.bodies.append(body)


def fetch_all(r: Replicator, peer: int, between=lambda: None) -> list[list[dict]]:
    pages, after = [], None
    while True:
        r.on_fetch(SimpleNamespace(body={"id": peer, "after": after}), None)
        body = r.ep.bodies[-1]
        pages.append(body["snaps"])
        between()
        if not body["more"] or not body["snaps"]:
            return pages
        after = body["snaps"][-1]["key"]


def replicator_holding(n: int, peer: int = 3) -> Replicator:
    r = Replicator(flows={}, view=SimpleNamespace(listeners=[]), every=10, make_actor=None, replay=None, transmit=None, on_recovered=None)
    r.ep = Replies()
    r.stores[peer] = {f"{i:08x}": {"key": f"{i:08x}", "v": 1, "actor": {"states": [b"s" * 100]}}
                      for i in reversed(range(n))}
    return r


def test_every_snapshot_comes_once_in_order_in_pages_within_the_budget(monkeypatch):
    r = replicator_holding(3000)
    sorts = []
    real = sorted
    monkeypatch.setattr(replication, "sorted", lambda xs: sorts.append(1) or real(xs), raising=False)
    pages = fetch_all(r, 3)
    keys = [s["key"] for p in pages for s in p]
    assert keys == sorted(r.stores[3]) and len(pages) > 5
    assert all(sum(replication._encoded_size(s) for s in p) <= MESSAGE_BUDGET for p in pages)
    assert len(sorts) == 1 and 3 not in r.fetch_order  # sorted once; forgotten when done


def test_snapshots_that_end_during_the_fetch_are_skipped():
    r = replicator_holding(2000)
    gone = {f"{i:08x}" for i in range(0, 2000, 7)}

    def end_some():
        for k in list(gone):
            r.stores[3].pop(k, None)
    pages = fetch_all(r, 3, between=end_some)
    keys = [s["key"] for p in pages for s in p]
    first = {s["key"] for s in pages[0]}
    assert len(keys) == len(set(keys)) and set(keys) == set(r.stores[3]) | (first & gone)
