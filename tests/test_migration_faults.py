"""Migration's failure paths and the drain, without sockets (no root): a
target that leaves the view, a target that restarted, actors that go idle
mid-migration, marker copies that come late (after any time), errors in
callbacks, states too big for a control message, and a drain that must end."""
from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import arrivals, migration, nf
from nfactor_xdp.dataplane.packet import classify
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats import marker
from nfactor_xdp.formats.messages import Endpoint, Message, MessageError, MsgType, encode
from tests.runtime_fakes import KEY, Peers, flow, runtime, set_view, udp, view


def the_marker(actor) -> memoryview:
    return memoryview(bytearray(marker.frame(actor.key, actor.orig_dir, actor.migration.payload)))


def waiting_for_marker(rt: Runtime, ep: Peers, actor) -> bytes:
    """Migrate `actor` to runtime 1 up to the marker; returns the marker frame."""
    rt.migrator.start_batch(1, [actor.key])
    ep.answer()  # create, then move
    assert actor.migration.step == "marker"
    return bytes(the_marker(actor))


# --- item 6: crashes and leaks ----------------------------------------------------
def test_a_target_that_left_the_view_is_never_sent_anything_and_the_batch_ends():
    rt, ep = runtime(max_migrations=1)
    a, b = flow(rt, 5000), flow(rt, 5001)
    batch = rt.migrator.start_batch(1, [a.key, b.key])  # one at a time: b waits its turn
    ep.answer()
    assert not rt.handle(the_marker(a))  # a's state goes to runtime 1 ...
    set_view(rt, view(peer_state="failed"))  # ... which then leaves the view
    ep.answer()  # runtime 1 had taken a's state: a is done, b's turn comes with no target
    report = batch.report()
    assert report["done"] and (report["succeeded"], report["failed"]) == (1, 1), report
    assert all(addr is not None for addr, _, _ in ep.sent)
    assert rt.flows.get(b.key).migration is None and rt.handle(udp(5001))  # b stays, intact


def test_a_target_gone_before_the_marker_rolls_back_without_sending_the_state():
    rt, ep = runtime()
    a = flow(rt)
    marker_frame = waiting_for_marker(rt, ep, a)
    set_view(rt, view(peer_state="failed"))
    assert not rt.handle(memoryview(bytearray(marker_frame)))
    assert not ep.to(MsgType.MIGRATE_STATE)
    back = ep.to(MsgType.MIGRATE_MOVE)[-1][1]
    assert back["to"] == 0 and back["marker"] is None  # the switch points at the source again
    assert rt.flows.get(a.key).migration is None


def test_a_target_that_restarted_and_refuses_the_state_is_rolled_back_not_left_holding_the_flow():
    rt, ep = runtime()
    a = flow(rt)
    rt.handle(memoryview(bytearray(waiting_for_marker(rt, ep, a))))
    # the target restarted meanwhile: a new process, which never heard of the flow
    ep.answer({"ok": False, "error": "no such incoming flow"}, only=MsgType.MIGRATE_STATE)
    back = ep.to(MsgType.MIGRATE_MOVE)[-1][1]
    assert back["to"] == 0 and back["from"] == 1, "the switch must point at the source again"
    assert rt.flows.get(a.key).migration is None and rt.migrator.stats["out_failed"] == 1


@pytest.mark.parametrize("side", ["source", "target"])
def test_an_actor_mid_migration_is_not_expired_and_its_marker_never_reaches_the_endpoint(side):
    rt, ep = runtime(idle_timeout=1.0)
    if side == "source":
        a = flow(rt)
        marker_frame = waiting_for_marker(rt, ep, a)
    else:
        key = flow(rt).key
        rt.flows.remove(key)
        rt.migrator.on_create(Message(MsgType.MIGRATE_CREATE, 1, "rt1", {"key": key.hex(), "chain": 1, "rule": 0,
                                                                        "orig_dir": 0}, 0), ("127.0.0.1", 2))
        a = rt.flows.get(key)
        marker_frame = marker.frame(key, a.orig_dir, marker.payload(marker.new_nonce()))
    rt.now += arrivals.ARRIVAL_TIMEOUT - 1  # idle for far longer than idle_timeout
    rt.expire_idle()
    assert rt.flows.get(a.key) is a, "expired in mid-migration"
    assert not rt.handle(memoryview(bytearray(marker_frame)))
    if side == "source":
        assert ep.to(MsgType.MIGRATE_STATE) and rt.migrator.stats["markers_consumed"] == 1
    else:
        assert not a.migration.buffer  # a copy of an old marker: never buffered, so never replayed
    assert not rt.xsk.sent


def test_a_late_marker_copy_is_dropped_after_any_time_never_forwarded(monkeypatch):
    rt, ep = runtime()
    a = flow(rt)
    copy = waiting_for_marker(rt, ep, a)
    assert not rt.handle(memoryview(bytearray(copy)))
    ep.answer()  # the target took the state: the flow left
    assert not rt.flows
    later = time.monotonic() + 3600  # an hour on: nothing about that migration is remembered ...
    monkeypatch.setattr(migration.time, "monotonic", lambda: later)
    other = flow(rt, 5001)
    assert not rt.handle(memoryview(bytearray(waiting_for_marker(rt, ep, other))))
    ep.answer()  # ... and other migrations came and went
    created = rt.stats["flows_created"]
    assert not rt.handle(memoryview(bytearray(copy)))
    assert rt.stats["flows_created"] == created and not rt.flows
    assert rt.migrator.stats["late_markers"] == 1


def test_a_marker_copy_of_a_failed_migration_is_dropped_on_the_fast_path_too():
    rt, ep = runtime()
    a = flow(rt)
    copy = waiting_for_marker(rt, ep, a)
    set_view(rt, view(peer_state="failed"))
    assert not rt.handle(memoryview(bytearray(copy)))  # the marker: rolled back, the flow stays
    set_view(rt, view())
    assert a.migration is None
    for _ in range(3):
        assert rt.handle(udp())  # back on the fast path
    assert rt.fast
    before = list(a.packets)
    assert not rt.handle(memoryview(bytearray(copy)))
    assert a.packets == before and rt.migrator.stats["late_markers"] == 1


@pytest.mark.parametrize("payload", [
    marker.payload(1)[:8] + b"\1" * 9,            # the magic, but 17 bytes
    b"\1" * 16,                                    # 16 bytes, no magic
    b"\2" * 16 + marker.payload(7),                # ends like a marker, longer
    marker.payload(5)[:8],                         # the magic alone
])
def test_real_traffic_that_resembles_a_marker_is_forwarded(payload):
    rt, ep = runtime()
    a = flow(rt)
    waiting_for_marker(rt, ep, a)
    assert rt.handle(udp(payload=payload))          # a migrating flow (slow path)
    assert rt.handle(udp(sport=6000, payload=payload))  # a new flow
    assert rt.handle(udp(sport=6000, payload=payload))  # a known flow (fast path)
    tcp = memoryview(bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="A")
                                     / payload)))
    assert rt.handle(tcp)
    assert rt.migrator.stats["late_markers"] == 0


def test_an_error_in_a_callback_is_counted_never_raised():
    a = Endpoint(("127.0.0.1", 0), KEY, "a")
    b = Endpoint(("127.0.0.1", 0), KEY, "b")
    try:
        def broken(msg):
            raise KeyError("a bug in a reply's callback")
        rid = a.request(b.address, MsgType.PING, {}, broken)
        a.request(b.address, MsgType.PING, {}, lambda msg: None, timeout=0.0, retries=0,
                  on_timeout=lambda rid: 1 / 0)
        deadline = time.monotonic() + 5
        got = []
        while len(got) < 2 and time.monotonic() < deadline:
            got += b.receive()
        for msg, addr in got:
            if msg.rid == rid:  # the other one is never answered: it times out
                b.reply(msg, addr, {"ok": True})
        b.send(a.address, MsgType.VIEW, {"after": "the replies"})
        seen = []
        while not seen and time.monotonic() < deadline:
            seen = a.receive()  # the failing callback runs here: it must not raise
        a.tick(time.monotonic() + 1)  # and the failing timeout here
        assert [m.type for m, _ in seen] == [MsgType.VIEW]  # what came with the reply is not lost
        assert a.counters["callback_errors"] == 2
    finally:
        a.close()
        b.close()


# --- item 7: states too big for a control message; the drain ends ----------------------
class Hoarder(nf.NetworkFunction):
    """An NF whose flow state outgrows any control message."""
    name, type_id = "hoarder", 14

    def allocate_flow_state(self):
        return {"blob": b""}

    def process_packet(self, pkt, state):
        state["blob"] += bytes(pkt.frame) * 100
        return True


@pytest.fixture
def hoarder(monkeypatch):
    monkeypatch.setattr(nf, "_BY_NAME", dict(nf._BY_NAME))
    monkeypatch.setattr(nf, "_BY_ID", dict(nf._BY_ID))
    nf.register(Hoarder)


def http_requests(n: int) -> list[bytes]:
    """Pipelined requests whose paths and hosts are bytes that are not UTF-8."""
    junk = bytes(range(0x80, 0x100)) * 2
    reqs = b"".join(b"GET /" + junk + b" HTTP/1.1\r\nHost: " + junk + b"\r\n\r\n" for _ in range(n))
    ip = IP(src="10.0.0.1", dst="10.0.0.2")
    frames, seq = [bytes(Ether() / ip / TCP(sport=40000, dport=80, flags="S", seq=0))], 1
    for i in range(0, len(reqs), 1400):
        frames.append(bytes(Ether() / ip / TCP(sport=40000, dport=80, flags="PA", seq=seq) / reqs[i:i + 1400]))
        seq += len(reqs[i:i + 1400])
    return frames


def heartbeat_load(rt: Runtime, ep: Peers) -> dict:
    rt.ep = ep
    rt.controller = rt.heartbeats = ("127.0.0.1", 3)
    ep.sent.clear()
    rt.send_heartbeat()
    return ep.to(MsgType.HEARTBEAT)[-1][1]["load"]


def drain_rounds(rt: Runtime, ep: Peers, rounds: int) -> list[dict]:
    """Heartbeats of a leaving runtime, each followed by what its peers and the switch do meanwhile."""
    loads = []
    for _ in range(rounds):
        loads.append(heartbeat_load(rt, ep))  # drains: migrations start
        ep.answer(only=MsgType.MIGRATE_CREATE)
        ep.answer(only=MsgType.MIGRATE_MOVE)
        for actor in list(rt.flows.values()):
            if actor.migration is not None and actor.migration.step == "marker":
                rt.handle(the_marker(actor))
        ep.answer()
    return loads


def test_a_drain_ends_with_pipelined_non_utf8_requests_and_a_state_too_big_reported(hoarder):
    rt, ep = runtime({"rules": [{"proto": "udp", "chain": ["hoarder"]}], "default_chain": ["http_parser"]})
    for f in http_requests(40):
        rt.handle(memoryview(bytearray(f)))
    for _ in range(30):
        rt.handle(udp(sport=7000, payload=b"y" * 100))
    (web,) = [a for a in rt.flows.values() if a.proto == 6]
    (big,) = [a for a in rt.flows.values() if a.proto == 17]
    assert web.states[0]["n_requests"] == 40
    set_view(rt, view(me_state="leaving"))
    loads = drain_rounds(rt, ep, 4)
    assert web.key not in rt.flows, "the http flow must migrate"
    assert list(rt.flows) == [big.key]  # the one that cannot: reported, and the drain is over
    assert loads[-1]["flows"] == loads[-1]["not_migratable"] == 1 and loads[-1]["migrating"] == 0
    assert web.state_bytes() <= nf.MAX_STATE_BYTES < big.state_bytes()
    summary = big.summary(detail=True)
    assert summary["migratable"] is False and summary["state_bytes"] > nf.MAX_STATE_BYTES
    report = rt.migrator.start_batch(1, [big.key]).report()
    assert report["not_migratable"] == 1 and report["failed"] == 1 and report["done"]
    assert report["not_migratable_flows"] == [big.key.hex()]
    # the controller stops the runtime: its flows are gone but the one that cannot move
    from nfactor_xdp.control.controller import Controller
    ctl = Controller.__new__(Controller)
    ctl.view, ctl.live, ctl.supervisor_addr, ctl.ep = {0: {"id": 0, "state": "leaving"}}, {0: {"load": loads[-1]}}, \
        lambda rt=None: ("127.0.0.1", 4), Peers()
    ctl.finish_drains()
    assert [(addr, body["id"]) for addr, body in ctl.ep.to(MsgType.RUNTIME_STOP)] == [(("127.0.0.1", 4), 0)]


def test_a_state_too_big_never_starts_a_migration_and_batches_are_pruned(hoarder):
    rt, ep = runtime({"default_chain": ["hoarder"]})
    for _ in range(30):
        rt.handle(udp())
    (big,) = rt.flows.values()
    for _ in range(500):
        b = rt.migrator.start_batch(1, [big.key])
        assert b.report()["done"] and b.not_migratable == [big.key]
    assert not ep.sent, "nothing goes to the target or the switch for a flow that cannot move"
    assert len(rt.migrator.batches) <= migration.KEEP_BATCHES
    assert rt.migrator.batches[b.id] is b  # the newest is kept for its report


def test_a_state_that_grows_past_a_message_after_the_move_is_rolled_back_and_reported(hoarder):
    rt, ep = runtime({"default_chain": ["hoarder"]})
    rt.handle(udp())
    (a,) = rt.flows.values()
    copy = waiting_for_marker(rt, ep, a)
    for _ in range(30):
        rt.handle(udp())  # frames ahead of the marker: the state grows
    assert not rt.handle(memoryview(bytearray(copy)))
    back = ep.to(MsgType.MIGRATE_MOVE)[-1][1]
    assert back["to"] == 0 and a.migration is None
    assert a.summary(detail=False)["migratable"] is False


def test_the_largest_state_allowed_fits_a_migration_and_a_snapshot():
    rt, _ = runtime()
    a = flow(rt)
    wire = a.to_wire(0.0)
    for nfs in (1, 15):  # one NF, or the longest chain
        wire["states"] = [b"\xff" * (nf.MAX_STATE_BYTES // nfs)] * nfs
        encode(MsgType.MIGRATE_STATE, 1 << 63, "rt15", {"key": a.key.hex(), "actor": wire}, KEY)
        snap = {"key": a.key.hex(), "v": 1 << 40, "actor": wire}
        encode(MsgType.SNAPSHOT, 1 << 63, "rt15", {"from": 15, "snaps": [snap], "drop": []}, KEY)
        encode(MsgType.REPLY, 1 << 63, "rt15", {"ok": True, "snaps": [snap], "more": True}, KEY)  # a recovery's page
    wire["states"] = [b"\xff" * 60_000]
    with pytest.raises(MessageError):
        encode(MsgType.MIGRATE_STATE, 1, "rt0", {"key": a.key.hex(), "actor": wire}, KEY)


def test_http_parser_records_fields_by_their_encoded_size_and_its_worst_state_fits():
    from tests.test_nf_http_parser import Conn, make_nf
    junk = bytes(range(0x80, 0x100)) * 3
    c = Conn(make_nf())
    for method in (b"M" * 24, b"HEAD"):  # every record as large as it can be: fields of bytes that are not UTF-8
        for _ in range(40):
            c.request(method + b" /" + junk + b" HTTP/1.1\r\nHost: " + junk + b"\r\n\r\n")
    for _ in range(40):
        c.response(b"HTTP/1.1 200 " + junk + b"\r\nContent-Length: 0\r\n\r\n")
    records = c.state["requests"] + c.state["responses"]
    assert len(records) == 64 and len(c.state["special"]) == 32 and c.state["n_errors"] == 0
    assert max(len(v.encode()) for r in records for v in r.values() if isinstance(v, str)) == 256
    # and both directions hold an unfinished header block as large as allowed
    c.request(b"GET /" + b"a" * 8180)
    c.response(b"HTTP/1.1 200 " + b"b" * 8170)
    assert [len(d["buf"]) for d in c.state["dirs"]] == [8185, 8183]
    assert c.nf.state_bytes(c.state) <= nf.MAX_STATE_BYTES


@pytest.mark.parametrize("pkt", [
    IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2),
    IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2),
    IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2),
    IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1, dport=2),
    IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / (b"\0" * 8),  # a protocol without ports
], ids=["udp", "tcp", "udp6", "tcp6", "gre"])
@pytest.mark.parametrize("after", [b"", b"\xa9"], ids=["bare", "padded"])
def test_a_marker_is_known_by_its_form_for_every_kind_of_flow(pkt, after):
    key = classify(bytes(Ether() / pkt))[1]
    payload = marker.payload(marker.new_nonce())
    frame = marker.frame(key, 0, payload) + after
    _, same, _, l4 = classify(frame)
    assert same == key and marker.carried(memoryview(frame), l4, key[36]) == payload
    longer = marker.frame(key, 0, payload + b"!") + after  # one more byte: real traffic
    assert marker.carried(longer, classify(longer)[3], key[36]) is None


def test_a_late_marker_is_asked_for_again_on_time_and_only_then():
    """The marker timer looks at the outgoing flows only once one may be late;
    each late marker is asked for again (a MOVE), the others are left alone."""
    rt, ep = runtime()
    a, b = flow(rt, 5000), flow(rt, 5001)
    waiting_for_marker(rt, ep, a)
    t_a = rt.migrator.out[a.key].deadline
    moves = len(ep.to(MsgType.MIGRATE_MOVE))
    rt.migrator.tick(t_a - 0.01)
    assert len(ep.to(MsgType.MIGRATE_MOVE)) == moves
    time.sleep(0.002)  # b's marker is due a little later than a's
    waiting_for_marker(rt, ep, b)
    t_b = rt.migrator.out[b.key].deadline
    assert t_b > t_a
    time.sleep(0.005)  # (a's marker, asked for again now, is due well after b's)
    rt.migrator.tick(t_a + 0.001)  # a's only
    assert [body["key"] for _, body in ep.to(MsgType.MIGRATE_MOVE)[moves + 1:]] == [a.key.hex()]
    ep.answer()  # a waits for its marker again, due MARKER_TIMEOUT from now
    rt.migrator.tick(t_b + 0.001)  # b's turn, though a's new deadline is later than b's
    assert [body["key"] for _, body in ep.to(MsgType.MIGRATE_MOVE)[moves + 1:]] == [a.key.hex(), b.key.hex()]
    assert rt.migrator.stats["marker_resends"] == 2


def test_a_batch_of_thousands_whose_target_leaves_ends_without_overflowing_the_stack():
    """Every waiting flow fails at once when the target leaves the view; each
    end used to start the next flow from inside the last one's, a call deeper
    per flow: a runtime migrating 5,000 flows died of a RecursionError."""
    import sys
    rt, ep = runtime(max_migrations=1)
    flows = [flow(rt, 5000 + i) for i in range(sys.getrecursionlimit() + 200)]
    batch = rt.migrator.start_batch(1, [a.key for a in flows])
    ep.answer()  # the first: create, then move
    set_view(rt, view(peer_state="failed"))  # the target leaves the view ...
    assert not rt.handle(the_marker(flows[0]))  # ... before the first flow's state: rolled back, all the rest fail
    report = batch.report()
    assert report["done"] and report["failed"] == len(flows) and report["succeeded"] == 0, report
    assert all(a.migration is None for a in flows) and rt.handle(udp(5001))


def _arriving(rt: Runtime, sport: int = 5000):
    key = flow(rt, sport).key
    rt.flows.remove(key)
    rt.migrator.on_create(Message(MsgType.MIGRATE_CREATE, 1, "rt1", {"key": key.hex(), "chain": 1, "rule": 0,
                                                                    "orig_dir": 0}, 0), ("127.0.0.1", 2))
    return rt.flows.get(key)


def test_an_arrival_whose_state_never_comes_is_let_go_and_its_frames_kept_for_the_source():
    """The source rolled back and its abort was lost (or it died): the target
    does not hold the flow, and buffer its frames, forever."""
    rt, ep = runtime()
    a, fresh = _arriving(rt, 5000), _arriving(rt, 5001)
    assert not rt.handle(udp(5000))  # held for the state
    a.migration.since -= arrivals.ARRIVAL_TIMEOUT + 1  # a's state is long overdue; the other's is not
    rt.expire_idle()
    assert rt.flows.get(a.key) is None and rt.flows.get(fresh.key) is fresh
    assert rt.migrator.stats["in_abandoned"] == 1
    assert rt.handle(udp(5000)) and rt.flows.get(a.key).migration is None  # the flow goes on, anew
    # a source asking late still gets the frames held for it
    rt.migrator.on_abort(Message(MsgType.MIGRATE_DONE, 2, "rt1", {"key": a.key.hex(), "abort": True}, 0),
                         ("127.0.0.1", 2))
    (_, reply), = ep.to(MsgType.REPLY)[-1:]
    assert reply["ok"] and len(reply["frames"]) == 1


def test_a_target_marked_failed_still_gets_the_abort_of_a_rolled_back_migration():
    """Marked failed is not dead: a runtime starved of CPU for a few heartbeats
    registers again with its actors, and must not keep an arrival forever
    (a flow with an actor on two runtimes, seen in a benchmark)."""
    rt, ep = runtime()
    a = flow(rt)
    waiting_for_marker(rt, ep, a)
    set_view(rt, view(peer_state="failed"))
    assert not rt.handle(the_marker(a))  # no state for a failed target: rolled back
    ep.answer(only=MsgType.MIGRATE_MOVE)  # the switch points at the source again; then the target is told
    assert [body["key"] for _, body in ep.to(MsgType.MIGRATE_DONE, addr=("127.0.0.1", 2))] == [a.key.hex()]
    assert rt.flows.get(a.key).migration is None


def test_in_the_runtimes_loop_a_state_leaves_only_after_the_batch_that_held_the_marker():
    """The frames of a batch go to TX after the whole batch: a marker seen in
    its middle must not send the state before the frames ahead of it are
    sent, or the target could forward the flow's next frame first."""
    rt, ep = runtime()
    a = flow(rt)
    marker_frame = waiting_for_marker(rt, ep, a)
    rt.migrator.defer_states = True  # as in Runtime.run
    assert rt.handle(udp())  # a frame ahead of the marker, in the same batch
    assert not rt.handle(memoryview(bytearray(marker_frame)))
    assert not ep.to(MsgType.MIGRATE_STATE) and rt.migrator.states_due
    rt.migrator.send_states()  # (after the batch's TX)
    assert len(ep.to(MsgType.MIGRATE_STATE)) == 1 and not rt.migrator.states_due
    rt.migrator.send_states()
    assert len(ep.to(MsgType.MIGRATE_STATE)) == 1  # once
