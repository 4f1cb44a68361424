"""Every bound on what a runtime holds is counted where it is hit and shown
in its status, and every frame a runtime receives is accounted for (no
root: a runtime without sockets, fed frame by frame)."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import arrivals, migration, replication
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.formats.flowkey import LO_TO_HI
from nfactor_xdp.formats.messages import Message, MsgType


def udp(sport=5000, payload=b"x"):
    return memoryview(bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2")
                                      / UDP(sport=sport, dport=53) / payload)))


class CountingSocket:
    """What the runtime's AF_XDP socket counts, for frames fed one at a time."""

    def __init__(self):
        self.rx = self.tx = self.not_forwarded = self.injected = 0
        self.sent: list[bytes] = []

    def feed(self, rt: Runtime, frame) -> bool:
        self.rx += 1
        ok = rt.handle(frame)
        if ok:
            self.tx += 1
        else:
            self.not_forwarded += 1
        return ok

    def send_frame(self, data) -> bool:
        self.injected += 1
        self.tx += 1
        self.sent.append(bytes(data))
        return True

    def reclaim(self) -> int:
        return 0

    def statistics(self) -> dict:
        return {"rx_packets": self.rx, "tx_packets": self.tx, "dropped_by_handler": self.not_forwarded,
                "frames_injected": self.injected, "handler_error_frames": 0, "tx_dropped_ring_full": 0}


class Endpoint:
    """Records what the runtime answers and asks its peers."""

    def __init__(self):
        self.replies: list[dict] = []
        self.requests: list[tuple] = []

    def reply(self, msg, addr, body):
        self.replies.append(body)

    def request(self, addr, msg_type, body, on_reply, **kw):
        self.requests.append((msg_type, body, on_reply))

    def send(self, addr, msg_type, body, rid=None):
        pass


def runtime(policy=None, rt_id: int = 1) -> tuple[Runtime, CountingSocket, Endpoint]:
    rt = Runtime(NodeConfig(name="t"), rt_id, policy=Policy.from_dict(policy or {"default_chain": ["flow_monitor"]}))
    rt.xsk, ep = CountingSocket(), Endpoint()
    rt.migrator.attach(ep, ("127.0.0.1", 9))
    rt.replicator.attach(ep)
    rt.view.update({"version": 1, "runtimes": [{"id": 0, "state": "running", "addr": ["127.0.0.1", 1]},
                                               {"id": 1, "state": "running", "addr": ["127.0.0.1", 2]}]})
    return rt, rt.xsk, ep


def msg(msg_type, body) -> Message:
    return Message(msg_type, 7, "rt0", body, 0)


def accounted(rt: Runtime) -> int:
    """received - (forwarded + held + markers + every drop): 0 when every frame is accounted for."""
    c = rt.packet_counts()
    return c["frames"] - c["forwarded"] - sum(c["held"].values()) - c["markers"] - sum(c["dropped"].values())


def arriving(rt: Runtime, ep: Endpoint, frame) -> bytes:
    """Make the flow of `frame` arrive at `rt` by migration (pass 1 of 3)."""
    from nfactor_xdp.dataplane.packet import classify
    key = classify(frame)[1]
    rt.migrator.on_create(msg(MsgType.MIGRATE_CREATE, {"key": key.hex(), "chain": 1, "rule": 0,
                                                       "orig_dir": LO_TO_HI}), None)
    assert ep.replies[-1] == {"ok": True}
    return key


def test_an_arriving_flow_holds_frames_up_to_its_limit_then_drops_and_counts(monkeypatch):
    monkeypatch.setattr(arrivals, "MAX_BUFFER", 10)
    rt, sock, ep = runtime()
    key = arriving(rt, ep, udp())
    for i in range(15):
        assert not sock.feed(rt, udp(payload=bytes([i])))
    c = rt.packet_counts()
    assert c["held"]["migration"] == 10 and c["dropped"]["migration_buffer_full"] == 5
    assert rt.limits()["migration_buffer"] == {"limit": 10, "unit": "frames per arriving flow", "dropped": 5}
    assert accounted(rt) == 0
    # the state comes: the ten held frames go out, in order, once
    wire = rt.make_actor(key, LO_TO_HI, 1, 0).to_wire(0.0)
    rt.migrator.on_state(msg(MsgType.MIGRATE_STATE, {"key": key.hex(), "actor": wire}), None)
    assert ep.replies[-1] == {"ok": True}
    assert [f[-1] for f in sock.sent] == list(range(10))
    assert rt.packet_counts()["sent_later"] == 10 and rt.flows.get(key).packets[0] == 10
    assert rt.packet_counts()["later"] == {"processed": 10, "sent": 10, "tx_failed": 0, "taken_over": 0,
                                           "dropped_by_chain": 0}


def test_an_aborted_arrival_hands_every_held_frame_back_in_pages():
    rt, sock, ep = runtime()
    key = arriving(rt, ep, udp())
    big = 1200 - 42
    for i in range(100):  # 100 frames of 1200 bytes: three control messages' worth
        sock.feed(rt, udp(payload=bytes([i]) * big))
    back, start = [], 0
    while start is not None:
        rt.migrator.on_abort(msg(MsgType.MIGRATE_DONE, {"key": key.hex(), "abort": True, "from": start}), None)
        page = ep.replies[-1]
        assert page["ok"] and sum(len(f[0]) for f in page["frames"]) <= arrivals.TAKE_BACK_BYTES
        back += [f[0][-1] for f in page["frames"]]
        start = page["next"]
    assert back == list(range(100))           # all of them, in order, once
    assert key not in rt.flows and rt.migrator.stats["in_aborted"] == 1
    # the source asks for the next page when told there is one
    src, _, src_ep = runtime(rt_id=0)
    m = migration.Outgoing(key, 1, 1)
    src.migrator._take_back(m, msg(MsgType.REPLY, {"ok": True, "frames": [], "next": 37}))
    assert src_ep.requests[-1][:2] == (MsgType.MIGRATE_DONE, {"key": key.hex(), "abort": True, "from": 37})


def test_a_recovering_runtime_holds_frames_up_to_its_limit_then_drops_and_counts(monkeypatch):
    monkeypatch.setattr(replication, "MAX_RECOVERY_BUFFER", 10)
    rt, sock, ep = runtime()
    rt.replicator.recovering = True
    for i in range(15):
        assert not sock.feed(rt, udp(sport=6000 + i))
    c = rt.packet_counts()
    assert c["held"]["recovery"] == 10 and c["dropped"]["recovery_buffer_full"] == 5
    assert rt.limits()["recovery_hold"]["dropped"] == 5
    assert accounted(rt) == 0
    registered = []
    rt.replicator.on_recovered = lambda: registered.append(True)
    rt.replicator.finish_recovery()   # no peer held anything: the held frames go through the chain now
    assert registered and rt.packet_counts()["sent_later"] == 10 and len(rt.flows) == 10


@pytest.mark.parametrize("drop_nf", [False, True])
def test_every_frame_is_accounted_for_chain_drops_markers_and_strays(drop_nf):
    policy = {"default_chain": ["flow_monitor", "firewall"],
              "nf_config": {"firewall": {"rules": [{"proto": "udp", "sport": "7000", "action": "drop"}]}}}
    rt, sock, ep = runtime(policy)
    for _ in range(5):
        sock.feed(rt, udp(sport=7000 if drop_nf else 7001))
    sock.feed(rt, memoryview(bytearray(bytes(Ether(type=0x0806) / (b"\0" * 28)))))  # not a flow
    c = rt.packet_counts()
    assert c["dropped"]["chain"] == (5 if drop_nf else 0) and c["dropped"]["not_flow"] == 1
    assert c["forwarded"] == (0 if drop_nf else 5)
    assert accounted(rt) == 0
