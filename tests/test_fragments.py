"""IP fragments in a runtime (no root): the reassembler's bounds and overlap
rule, and a runtime without sockets that runs the chain of a fragmented
datagram's real flow and sends its fragments on only if the chain allows it;
VLAN-tagged and other-protocol flows through the same chain."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Dot1Q, Ether

from nfactor_xdp.dataplane.fragments import MAX_FRAGMENTS, Reassembler
from nfactor_xdp.dataplane.packet import FLOW, classify
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats.config import NodeConfig

A, B, A6, B6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7), ("NOP", None)]  # 32-byte header: 4 fragments


def mac() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # given: scapy would look them up


def frames(pkts, eth=None) -> list[bytes]:
    return [bytes((eth or mac()) / p) for p in pkts]


def syn4(dport=22, ident=1):
    return IP(src=A, dst=B, id=ident) / TCP(sport=40000, dport=dport, flags="S", options=SYN_OPTIONS)


def frags4(pkt, size=8, eth=None) -> list[bytes]:
    return frames(fragment(pkt, fragsize=size), eth)


def frags6(payload, ident=9, size=1280, dst=B6) -> list[bytes]:
    return frames(fragment6(IPv6(src=A6, dst=dst) / IPv6ExtHdrFragment(id=ident) / payload, size))


def key_of(frame) -> bytes:
    kind, key, _, l4 = classify(frame)
    assert kind == FLOW and l4 == -1
    return key


def feed(r: Reassembler, fs, now=0.0):
    out = None
    for f in fs:
        out = r.add(f, key_of(f), now)
    return out


def reassembler(**kw) -> Reassembler:
    return Reassembler(**{"max_datagrams": 16, "max_bytes": 1 << 20, "timeout": 5.0, **kw})


# --- the reassembler ------------------------------------------------------------------

@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]])
def test_ipv4_fragments_in_any_order_give_the_datagram_with_its_ports(order):
    fs = frags4(syn4())
    r = reassembler()
    done = feed(r, [fs[i] for i in order])
    assert done is not None
    sent, whole = done
    assert sent == [fs[i] for i in order]  # the fragments, in arrival order
    kind, key, _, l4 = classify(whole)
    assert kind == FLOW and l4 >= 0
    assert bytes(Ether(whole)[TCP]) == bytes(syn4()[TCP]) and Ether(whole)[TCP].dport == 22
    assert key == classify(bytes(mac() / syn4()))[1]  # the unfragmented SYN's key
    assert r.stats["reassembled"] == 1 and r.stats["held"] == 4 and not r.pending and r.bytes_held == 0


def test_ipv6_fragments_with_an_unfragmentable_header_and_a_tag():
    payload = UDP(sport=5353, dport=53) / (b"q" * 3000)
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(id=4) / payload
    fs = frames(fragment6(pkt, 1280), mac() / Dot1Q(vlan=30))
    assert len(fs) == 3
    sent, whole = feed(reassembler(), fs[::-1])
    kind, key, _, l4 = classify(whole)
    assert kind == FLOW and key[40:44] == b"\0\x1e\0\0"  # VLAN 30 kept in the key
    assert key == classify(bytes(mac() / Dot1Q(vlan=30) / IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / payload))[1]
    got = Ether(whole)[UDP]
    assert (got.sport, got.dport, got.load) == (5353, 53, b"q" * 3000)


def test_an_overlapping_fragment_drops_the_whole_datagram():
    fs = frags4(syn4())
    r = reassembler()
    assert feed(r, fs[:2]) is None
    liar = bytes(mac() / IP(src=A, dst=B, id=1, proto=6, flags="MF", frag=1) / (b"\x00" * 16))  # bytes 8-24
    assert r.add(liar, key_of(liar), 0.0) is None
    assert r.stats["overlapping"] == 1 and not r.pending and r.frames_held == 0
    assert r.stats["discarded"] == 3 and r.stats["held"] == 3
    assert feed(r, fs[2:]) is None  # the rest starts a new datagram that never completes
    assert r.stats["reassembled"] == 0


def test_a_duplicate_is_dropped_alone_and_the_datagram_still_completes():
    fs = frags4(syn4())
    r = reassembler()
    feed(r, fs[:2])
    forged = bytearray(fs[1])
    forged[-1] ^= 0xFF  # same place, other bytes: never sent, never seen by the chain
    assert r.add(bytes(forged), key_of(bytes(forged)), 0.0) is None
    sent, whole = feed(r, fs[2:])
    assert r.stats["duplicate"] == 1 and r.stats["dropped"] == 1
    assert sent == fs and bytes(Ether(whole)[TCP]) == bytes(syn4()[TCP])


def test_oversized_inconsistent_and_malformed_fragments():
    r = reassembler()
    big = bytes(mac() / IP(src=A, dst=B, id=3, proto=17, frag=8189) / (b"z" * 48))  # ends past 65535
    assert r.add(big, key_of(big), 0.0) is None
    assert r.stats["oversized"] == 1 and not r.pending
    last1 = bytes(mac() / IP(src=A, dst=B, id=4, proto=17, frag=2) / (b"a" * 8))
    last2 = bytes(mac() / IP(src=A, dst=B, id=4, proto=17, frag=3) / (b"b" * 8))
    feed(r, [last1, last2])
    assert r.stats["inconsistent"] == 1 and not r.pending
    odd = bytes(mac() / IP(src=A, dst=B, id=5, proto=17, flags="MF") / (b"c" * 13))  # not a multiple of 8
    assert r.add(odd, key_of(odd), 0.0) is None
    assert r.stats["malformed"] == 1 and not r.pending


def test_a_datagram_not_complete_in_time_is_dropped_with_its_fragments():
    fs = frags4(syn4())
    r = reassembler(timeout=2.0)
    feed(r, fs[:3], now=10.0)
    assert r.expire(11.9) == 0 and r.frames_held == 3
    assert r.add(fs[3], key_of(fs[3]), 12.0) is None  # too late: the datagram went, this starts anew
    assert r.stats["timed_out"] == 1 and r.stats["discarded"] == 3
    assert r.frames_held == 1 and r.expire(14.0) == 1 and r.frames_held == 0 and r.bytes_held == 0


def test_bounds_on_datagrams_bytes_and_fragments_are_counted():
    r = reassembler(max_datagrams=2)
    for ident in range(3):
        first = frags4(syn4(ident=ident))[0]
        r.add(first, key_of(first), 0.0)
    assert len(r.pending) == 2 and r.stats["full_datagrams"] == 1 and r.stats["dropped"] == 1
    r = reassembler(max_bytes=100)  # two of the four 42-byte fragments
    fs = frags4(syn4())
    feed(r, fs)
    assert r.stats["full_bytes"] == 2 and r.bytes_held <= 100 and r.stats["reassembled"] == 0
    r = reassembler()
    tiny = frags4(IP(src=A, dst=B, id=6) / UDP(sport=1, dport=2) / (b"t" * 8 * MAX_FRAGMENTS), size=8)
    assert feed(r, tiny) is None
    assert r.stats["too_many_fragments"] == 1 and r.stats["reassembled"] == 0 and not r.pending
    assert r.stats["discarded"] == MAX_FRAGMENTS + 1 and r.frames_held == 0


# --- a runtime: the chain sees the datagram's real flow ---------------------------------

class Socket:
    """What the runtime's AF_XDP socket counts, for frames fed one at a time."""

    def __init__(self):
        self.rx = self.forwarded = self.not_forwarded = 0
        self.sent: list[bytes] = []

    def feed(self, rt, fs) -> list[bool]:
        out = []
        for f in fs:
            self.rx += 1
            ok = rt.handle(memoryview(bytearray(f)))
            self.forwarded += ok
            self.not_forwarded += not ok
            out.append(ok)
        return out

    def send_frame(self, data) -> bool:
        self.sent.append(bytes(data))
        return True

    def reclaim(self) -> int:
        return 0

    def statistics(self) -> dict:
        return {"rx_packets": self.rx, "tx_packets": self.forwarded + len(self.sent),
                "dropped_by_handler": self.not_forwarded, "frames_injected": len(self.sent),
                "handler_error_frames": 0, "tx_dropped_ring_full": 0}


FIREWALL = {"default_chain": ["firewall"],
            "nf_config": {"firewall": {"rules": [{"proto": "tcp", "dport": "22", "action": "drop"},
                                                 {"proto": "gre", "action": "drop"}]}}}


def runtime(policy=FIREWALL) -> tuple[Runtime, Socket]:
    rt = Runtime(NodeConfig(name="t"), 0, policy=Policy.from_dict(policy))
    rt.xsk = Socket()
    return rt, rt.xsk


def accounted(rt) -> int:
    c = rt.packet_counts()
    return c["frames"] - c["forwarded"] - sum(c["held"].values()) - c["markers"] - sum(c["dropped"].values())


def test_a_fragmented_syn_to_a_dropped_port_is_dropped_and_an_allowed_datagram_is_sent_whole():
    """The issue's case: `tcp dport 22 drop`; the SYN as four IPv4 fragments
    (and as IPv6 fragments) must not pass, where the old runtime matched them
    as port 0 and forwarded them."""
    rt, sock = runtime()
    assert sock.feed(rt, frags4(syn4())) == [False] * 4
    assert sock.feed(rt, frags6(TCP(sport=40000, dport=22, flags="S", options=SYN_OPTIONS), size=64)) == [False] * 2
    assert sock.sent == []
    st = rt.fragments.status()
    assert st["chain_dropped_datagrams"] == 2 and st["chain_dropped"] == 6 and st["frames_held"] == 0
    flows = {str(a.summary()["flow"]): a for a in rt.fragments.side.values()}
    assert set(flows) == {"tcp 10.0.0.1:40000 <-> 10.0.0.2:22", "tcp [fd00::1]:40000 <-> [fd00::2]:22"}
    assert all(a.summary()["nfs"]["firewall"]["verdict"] == "drop" for a in flows.values())
    allowed = frags4(IP(src=A, dst=B, id=2) / UDP(sport=5000, dport=53) / (b"u" * 3000), size=1480)
    allowed6 = frags6(UDP(sport=5000, dport=53) / (b"v" * 3000), ident=10)
    assert sock.feed(rt, allowed[::-1] + allowed6) == [False] * (len(allowed) + len(allowed6))
    assert sock.sent == allowed[::-1] + allowed6  # as they came, untouched
    c = rt.packet_counts()
    assert c["held"]["fragments"] == 6 + len(allowed) + len(allowed6) and accounted(rt) == 0
    assert c["later"]["processed"] == c["held"]["fragments"] and c["later"]["dropped_by_chain"] == 6
    assert not rt.flows  # none of these is this runtime's flow in the switch


def test_fragments_can_be_dropped_by_policy():
    rt, sock = runtime({**FIREWALL, "fragments": "drop"})
    fs = frags4(IP(src=A, dst=B, id=3) / UDP(sport=5000, dport=53) / (b"u" * 100), size=64)
    sock.feed(rt, fs)
    assert sock.sent == [] and rt.packet_counts()["dropped"]["fragments"] == len(fs) and accounted(rt) == 0
    assert rt.fragments.status()["policy_dropped"] == len(fs)


def test_a_fragments_only_actor_becomes_the_flow_when_its_packets_come_here():
    rt, sock = runtime({"default_chain": ["flow_monitor"]})
    dgram = IP(src=A, dst=B, id=4) / UDP(sport=5000, dport=53) / (b"u" * 100)
    sock.feed(rt, frags4(dgram, size=64))
    (side,) = rt.fragments.side.values()
    assert sock.feed(rt, [bytes(mac() / IP(src=B, dst=A) / UDP(sport=53, dport=5000))]) == [True]
    assert rt.flows.get(side.key) is side and not rt.fragments.side
    assert side.packets == [1, 1]
    sock.feed(rt, frags4(IP(src=A, dst=B, id=5) / UDP(sport=5000, dport=53) / (b"w" * 100), size=64))
    assert side.packets == [2, 1] and len(sock.sent) == 4
    rt.now += rt.cfg.idle_timeout + 1
    rt.expire_idle()
    assert not rt.flows


@pytest.mark.parametrize("tags", [[0], [100], [100, 200]], ids=["vid0", "vid100", "qinq"])
def test_tagged_flows_go_through_the_chain_like_untagged_ones(tags):
    rt, sock = runtime()
    eth = mac()
    for vid in tags:
        eth = eth / Dot1Q(vlan=vid)
    syn, other = (bytes(eth / IP(src=A, dst=B) / TCP(sport=40000, dport=p, flags="S")) for p in (22, 80))
    assert sock.feed(rt, [syn, other]) == [False, True]
    assert {a.summary()["flow"] for a in rt.flows.values()} == {
        f"tcp 10.0.0.1:40000 <-> 10.0.0.2:{p}" + (f" vlan {'.'.join(map(str, tags))}" if tags != [0] else "")
        for p in (22, 80)}


def test_a_gre_flow_is_dropped_by_a_proto_rule_and_esp_passes():
    rt, sock = runtime()
    gre, esp = (bytes(mac() / IP(src=A, dst=B, proto=p) / (b"\0" * 24)) for p in (47, 50))
    assert sock.feed(rt, [gre, esp, gre]) == [False, True, False]
    assert {a.summary()["flow"] for a in rt.flows.values()} == {"gre 10.0.0.1 <-> 10.0.0.2",
                                                               "esp 10.0.0.1 <-> 10.0.0.2"}
    assert not rt.flows.fast  # portless flows never take the fast path (ESP's bytes change per packet)


def test_fragments_only_actors_are_bounded_the_oldest_goes(monkeypatch):
    from nfactor_xdp.dataplane import fragments
    from nfactor_xdp.formats.flowkey import FlowKey
    monkeypatch.setattr(fragments, "MAX_SIDE_FLOWS", 3)
    rt, sock = runtime()
    for port in range(5):
        sock.feed(rt, frags4(IP(src=A, dst=B, id=port) / UDP(sport=6000 + port, dport=53) / (b"u" * 64), size=32))
    assert len(rt.fragments.side) == 3 and rt.fragments.stats["side_flows_evicted"] == 2
    assert sorted(FlowKey.from_bytes(k).lo_port for k in rt.fragments.side) == [6002, 6003, 6004]
    assert len(sock.sent) == 5 * 3 and rt.limits()["fragment_side_flows"]["evicted"] == 2
