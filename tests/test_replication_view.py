"""Replication follows the view (no root, a runtime without sockets): a peer
that restarted or refused is used again once it runs again, actors whose
replica left are placed anew and send their snapshot at once, and a
recovered runtime knows where its flows' snapshots are."""
from __future__ import annotations

from nfactor_xdp.formats.messages import MsgType
from tests.runtime_fakes import flow, runtime, set_view, udp, view

K = 4
OLD, NEW = ("127.0.0.1", 2), ("127.0.0.1", 22)   # runtime 1's control address before and after its restart
THIRD = ("127.0.0.1", 3)


def snapshotted(ep, addr) -> dict:
    """Key hex -> the latest version sent to `addr`."""
    out = {}
    for _, body in ep.to(MsgType.SNAPSHOT, addr):
        for s in body["snaps"]:
            out[s["key"]] = max(out.get(s["key"], 0), s["v"])
    return out


def flush(rt, ep, reply=None) -> None:
    """What the runtime's loop does after each batch, and its peers' answers."""
    for _ in range(5):
        rt.replicator.flush()
        ep.answer(reply, only=MsgType.SNAPSHOT)


def test_a_peer_that_restarted_gets_every_snapshot_again_without_new_packets():
    rt, ep = runtime(snapshot_every=K)
    actors = [flow(rt, 5000 + i) for i in range(10)]
    flush(rt, ep)
    assert set(snapshotted(ep, OLD)) == {a.key.hex() for a in actors}
    set_view(rt, view(peer_state="failed", peer_addr=OLD))  # killed -9
    for a in actors:
        for _ in range(K):
            rt.handle(udp(5000 + actors.index(a)))  # packets while it is down: snapshots due, nowhere to go
    flush(rt, ep)
    set_view(rt, view(peer_state="starting", peer_addr=NEW))  # restarted, recovering its own flows
    flush(rt, ep)
    assert not ep.to(MsgType.SNAPSHOT, NEW), "a starting runtime is no replica yet"
    set_view(rt, view(peer_state="running", peer_addr=NEW))
    flush(rt, ep)  # no packet since: the view change alone sends them
    assert snapshotted(ep, NEW) == {a.key.hex(): a.snap_version for a in actors}
    assert all(a.replica == 1 for a in actors)
    rt.handle(udp(5000))  # and it is the replica from now on
    for _ in range(K):
        rt.handle(udp(5000))
    flush(rt, ep)
    assert snapshotted(ep, NEW)[actors[0].key.hex()] == actors[0].snap_version


def test_a_peer_that_refused_is_asked_again_once_it_runs_again():
    rt, ep = runtime(snapshot_every=K)
    a = flow(rt)
    flush(rt, ep, {"ok": False, "error": "refused: leaving or full"})
    assert rt.replicator.stats["refused"] == 1
    set_view(rt, view(peer_state="running", peer_addr=NEW))  # the same runtime, restarted: an empty store
    flush(rt, ep)
    assert snapshotted(ep, NEW) == {a.key.hex(): a.snap_version}


def test_the_flows_of_a_replica_that_left_are_placed_anew_at_once():
    third = {"id": 2, "state": "running", "addr": list(THIRD), "load": {"cpu": 0.9}}
    rt, ep = runtime(snapshot_every=K)
    set_view(rt, view(more=[third]))
    actors = [flow(rt, 5000 + i) for i in range(5)]
    flush(rt, ep)
    assert {a.replica for a in actors} == {1}  # the least loaded
    set_view(rt, view(peer_state="leaving", more=[third]))
    flush(rt, ep)
    assert {a.replica for a in actors} == {2}
    assert set(snapshotted(ep, THIRD)) == {a.key.hex() for a in actors}
    set_view(rt, view(peer_state="running", peer_addr=NEW, more=[third]))  # a new runtime 1: no move back
    flush(rt, ep)
    assert {a.replica for a in actors} == {2} and not ep.to(MsgType.SNAPSHOT, NEW)


def test_a_lost_snapshot_message_is_sent_again():
    rt, ep = runtime(snapshot_every=K)
    a = flow(rt)
    rt.replicator.flush()
    assert ep.time_out(MsgType.SNAPSHOT) == 1
    ep.sent.clear()
    flush(rt, ep)
    assert snapshotted(ep, OLD) == {a.key.hex(): a.snap_version}


def test_a_recovered_runtime_takes_the_newest_snapshot_and_knows_its_replica():
    source, _ = runtime(snapshot_every=K)
    a = flow(source)
    for _ in range(7):
        source.handle(udp())
    wire = a.to_wire(0.0)
    older = {"key": a.key.hex(), "v": 3, "actor": dict(wire, packets=[3, 0])}
    newer = {"key": a.key.hex(), "v": 5, "actor": dict(wire, packets=[8, 0])}
    third = {"id": 2, "state": "running", "addr": list(THIRD)}
    rt, ep = runtime(snapshot_every=K)
    set_view(rt, view(more=[third]))
    rt.replicator.on_recovered = lambda: None  # (registers as running)
    rt.replicator.start_recovery()
    # runtime 1 answers first with an old snapshot (it held the flow before runtime 2 did)
    ep.answer({"ok": True, "snaps": [older], "more": False}, only=MsgType.SNAPSHOT_FETCH, addr=OLD)
    ep.answer({"ok": True, "snaps": [newer], "more": False}, only=MsgType.SNAPSHOT_FETCH, addr=THIRD)
    assert not rt.replicator.recovering
    got = rt.flows.get(a.key)
    assert got.snap_version == 5 and got.packets == [8, 0] and got.replica == 2
    rt.now += 3600
    rt.expire_idle()  # the flow ends: the runtime holding its snapshot forgets it
    assert [body["drop"] for _, body in ep.to(MsgType.SNAPSHOT, THIRD)] == [[a.key.hex()]]
