"""Crafted frames and how the node must classify each one: the same corpus
drives the Python parser tests (no root) and the XDP program tests
(BPF_PROG_TEST_RUN), so the two parsers cannot drift apart."""
from __future__ import annotations

import random
from dataclasses import dataclass

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from nfactor_xdp.dataplane.packet import DROP, FLOW, OTHER

SRC_MAC, DST_MAC = "02:77:00:00:00:01", "02:77:00:00:00:02"
A4, B4 = "10.77.0.1", "10.77.0.2"
A6, B6 = "fd77::1", "fd77::2"


def eth(payload) -> Ether:
    return Ether(src=SRC_MAC, dst=DST_MAC) / payload


@dataclass
class Case:
    name: str
    frame: bytes
    kind: int          # packet.FLOW / OTHER / DROP
    counter: str       # the switch counter that must move (classification or drop reason)
    reverse: bytes | None = None  # the same flow's frame in the other direction


def _b(pkt) -> bytes:
    return bytes(pkt)


def tagged(*vids: int, outer_type: int = 0x8100) -> Ether:
    """An Ethernet header with VLAN tags (outermost first): 802.1Q each, or
    `outer_type` (0x88A8: 802.1ad) for the first."""
    out = Ether(src=SRC_MAC, dst=DST_MAC)
    for i, vid in enumerate(vids):
        out = out / (Dot1AD(vlan=vid) if i == 0 and outer_type == 0x88A8 else Dot1Q(vlan=vid))
    return out


def cases() -> list[Case]:
    tcp4 = eth(IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="S"))
    tcp4r = eth(IP(src=B4, dst=A4) / TCP(sport=80, dport=40000, flags="SA"))
    udp4 = eth(IP(src=A4, dst=B4) / UDP(sport=5000, dport=53) / b"q")
    udp4r = eth(IP(src=B4, dst=A4) / UDP(sport=53, dport=5000) / b"r")
    tcp6 = eth(IPv6(src=A6, dst=B6) / TCP(sport=40001, dport=443))
    tcp6r = eth(IPv6(src=B6, dst=A6) / TCP(sport=443, dport=40001))
    udp6 = eth(IPv6(src=A6, dst=B6) / UDP(sport=6000, dport=7000) / (b"x" * 10))
    full_tcp = _b(tcp4)
    ip_only = _b(eth(IP(src=A4, dst=B4, proto=6)))
    rnd = random.Random(7)
    out = [
        Case("tcp4", _b(tcp4), FLOW, "to_runtime", _b(tcp4r)),
        Case("udp4", _b(udp4), FLOW, "to_runtime", _b(udp4r)),
        Case("tcp6", _b(tcp6), FLOW, "to_runtime", _b(tcp6r)),
        Case("udp6", _b(udp6), FLOW, "to_runtime"),
        Case("tcp4 with options", _b(eth(IP(src=A4, dst=B4, options=b"\x94\x04\x00\x00") / TCP(sport=1, dport=2))),
             FLOW, "cls_ip_options"),
        Case("ipv4 first fragment", _b(eth(IP(src=A4, dst=B4, flags="MF", proto=17) / UDP(sport=9, dport=9) / (b"a" * 16))),
             FLOW, "cls_fragment"),
        Case("ipv4 later fragment", _b(eth(IP(src=A4, dst=B4, frag=3, proto=17) / (b"b" * 24))),
             FLOW, "cls_fragment"),
        Case("ipv6 hop-by-hop + dest opts", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                                                  / UDP(sport=1, dport=2))), FLOW, "cls_ipv6_ext"),
        Case("ipv6 routing header", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(addresses=[B6])
                                          / TCP(sport=3, dport=4))), FLOW, "cls_ipv6_ext"),
        Case("ipv6 fragment", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=10, m=0, nh=17) / (b"c" * 16))),
             FLOW, "cls_fragment"),
        Case("arp", _b(Ether(src=SRC_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=A4, pdst=B4)), OTHER, "cls_arp"),
        Case("icmp echo", _b(eth(IP(src=A4, dst=B4) / ICMP())), OTHER, "cls_icmp"),
        Case("icmpv6 echo", _b(eth(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())), OTHER, "cls_icmp"),
        # IP protocols other than TCP/UDP/ICMP: flows keyed by addresses and protocol
        Case("gre", _b(eth(IP(src=A4, dst=B4, proto=47) / (b"\0" * 8))), FLOW, "cls_other_proto",
             _b(eth(IP(src=B4, dst=A4, proto=47) / (b"\0" * 8)))),
        Case("esp4", _b(eth(IP(src=A4, dst=B4, proto=50) / (b"\1" * 24))), FLOW, "cls_other_proto"),
        Case("sctp4 (no L4 parsing)", _b(eth(IP(src=A4, dst=B4, proto=132) / (b"\2" * 4))), FLOW, "cls_other_proto"),
        Case("ip-in-ip, empty payload", _b(eth(IP(src=A4, dst=B4, proto=4))), FLOW, "cls_other_proto"),
        Case("gre6", _b(eth(IPv6(src=A6, dst=B6, nh=47) / (b"\0" * 8))), FLOW, "cls_other_proto",
             _b(eth(IPv6(src=B6, dst=A6, nh=47) / (b"\0" * 8)))),
        Case("ipv6 no next header", _b(eth(IPv6(src=A6, dst=B6, nh=59))), FLOW, "cls_other_proto"),
        Case("esp6 behind hop-by-hop", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop(nh=50) / (b"\3" * 16))),
             FLOW, "cls_other_proto"),
        Case("ipv6 esp behind an overrunning dest opts", _b(eth(IPv6(src=A6, dst=B6, nh=60)
                                                                / (bytes([50, 9]) + b"\0" * 6))),
             DROP, "drop_bad_ipv6_ext"),
        # VLAN tags: one or two are parsed through, the VIDs join the key
        Case("vlan tagged tcp", _b(tagged(5) / IP(src=A4, dst=B4) / TCP()), FLOW, "cls_vlan",
             _b(tagged(5) / IP(src=B4, dst=A4) / TCP(sport=80, dport=20, flags="SA"))),
        Case("vlan 0 (priority tag) tcp", _b(tagged(0) / IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="S")),
             FLOW, "cls_vlan"),
        Case("qinq 802.1ad+802.1Q udp6", _b(tagged(100, 200, outer_type=0x88A8) / IPv6(src=A6, dst=B6)
                                            / UDP(sport=1, dport=2)), FLOW, "cls_vlan",
             _b(tagged(100, 200, outer_type=0x88A8) / IPv6(src=B6, dst=A6) / UDP(sport=2, dport=1))),
        Case("double 802.1Q tcp4", _b(tagged(7, 8) / IP(src=A4, dst=B4) / TCP(sport=22, dport=2222)),
             FLOW, "cls_vlan"),
        Case("802.1ad tagged gre", _b(tagged(9, outer_type=0x88A8) / IP(src=A4, dst=B4, proto=47) / (b"\0" * 4)),
             FLOW, "cls_other_proto"),
        Case("vlan tagged ipv4 fragment", _b(tagged(5) / IP(src=A4, dst=B4, frag=8, proto=6) / (b"f" * 16)),
             FLOW, "cls_fragment"),
        Case("three vlan tags", _b(tagged(1, 2, 3) / IP(src=A4, dst=B4) / TCP()), DROP, "drop_vlan_deep"),
        Case("three vid-0 tags", _b(tagged(0, 0, 0) / IP(src=A4, dst=B4) / TCP()), DROP, "drop_vlan_deep"),
        Case("802.1ad inside 802.1Q", _b(Ether(src=SRC_MAC, dst=DST_MAC, type=0x8100) / b"\x00\x05\x88\xa8"
                                        / b"\x00\x06\x08\x00" / IP(src=A4, dst=B4) / TCP()),
             DROP, "drop_vlan_deep"),
        Case("vlan tagged arp", _b(tagged(5) / ARP(psrc=A4, pdst=B4)), OTHER, "cls_arp"),
        Case("vlan tagged icmp", _b(tagged(5) / IP(src=A4, dst=B4) / ICMP()), OTHER, "cls_icmp"),
        Case("vlan tag cut short", _b(tagged(5) / IP(src=A4, dst=B4) / TCP())[:16], DROP, "drop_short_eth"),
        Case("inner vlan tag cut short", _b(tagged(5, 6) / IP(src=A4, dst=B4) / TCP())[:20], DROP, "drop_short_eth"),
        Case("vlan tagged ipv4 cut short", _b(tagged(5) / IP(src=A4, dst=B4) / TCP())[:30], DROP, "drop_bad_ip"),
        # fragments: keyed without ports, whatever follows the fragment header
        Case("ipv6 first fragment", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=0, m=1, nh=6)
                                           / TCP(sport=1, dport=22))), FLOW, "cls_fragment"),
        Case("ipv6 fragment of a dest-opts chain", _b(eth(IPv6(src=A6, dst=B6)
                                                          / IPv6ExtHdrFragment(offset=3, m=1, nh=60)
                                                          / (b"\xff" * 24))), FLOW, "cls_fragment"),
        Case("ipv6 fragment of icmpv6", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=3, m=0, nh=58)
                                               / (b"\0" * 8))), OTHER, "cls_icmp"),
        Case("ipv6 atomic fragment (no offset, no M)", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=17)
                                                              / UDP(sport=3, dport=4))), FLOW, "cls_ipv6_ext"),
        Case("ipv4 esp fragment", _b(eth(IP(src=A4, dst=B4, proto=50, flags="MF") / (b"\4" * 16))),
             FLOW, "cls_fragment"),
        Case("non-ip ethertype", _b(Ether(src=SRC_MAC, dst=DST_MAC, type=0x88B5) / (b"\0" * 46)), OTHER, "cls_non_ip"),
        Case("runt 10 bytes", b"\x02" * 10, DROP, "drop_short_eth"),
        Case("empty-ish 13 bytes", b"\x00" * 13, DROP, "drop_short_eth"),
        Case("ipv4 truncated header", full_tcp[:14 + 12], DROP, "drop_bad_ip"),
        Case("ipv4 ihl 3", _b(eth(IP(src=A4, dst=B4, ihl=3) / TCP())), DROP, "drop_bad_ip"),
        Case("ipv4 version 5", _b(eth(IP(src=A4, dst=B4, version=5) / TCP())), DROP, "drop_bad_ip"),
        Case("ipv4 tot_len beyond frame", _b(eth(IP(src=A4, dst=B4, len=1400) / TCP())), DROP, "drop_bad_ip"),
        Case("ipv4 tot_len below ihl", _b(eth(IP(src=A4, dst=B4, len=10) / TCP())), DROP, "drop_bad_ip"),
        Case("ipv4 options past frame", ip_only[:14] + bytes([0x4F]) + ip_only[15:], DROP, "drop_bad_ip"),
        Case("tcp truncated", _b(eth(IP(src=A4, dst=B4, proto=6) / (b"\0" * 10))), DROP, "drop_bad_l4"),
        Case("tcp doff 2", _b(eth(IP(src=A4, dst=B4) / TCP(dataofs=2))), DROP, "drop_bad_l4"),
        Case("tcp doff past frame", _b(eth(IP(src=A4, dst=B4) / TCP(dataofs=15))), DROP, "drop_bad_l4"),
        Case("udp truncated", _b(eth(IP(src=A4, dst=B4, proto=17) / (b"\0" * 4))), DROP, "drop_bad_l4"),
        Case("udp len 3", _b(eth(IP(src=A4, dst=B4) / UDP(len=3))), DROP, "drop_bad_l4"),
        Case("ipv6 truncated", _b(eth(IPv6(src=A6, dst=B6)))[:14 + 30], DROP, "drop_bad_ip"),
        Case("ipv6 payload_len beyond frame", _b(eth(IPv6(src=A6, dst=B6, plen=900) / UDP())), DROP, "drop_bad_ip"),
        Case("ipv6 ext header truncated", _b(eth(IPv6(src=A6, dst=B6, nh=0, plen=4) / (b"\x11\x00\x00\x00"))),
             DROP, "drop_bad_ipv6_ext"),
        Case("ipv6 ext chain too long", _b(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                                              / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                                              / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / UDP())),
             DROP, "drop_bad_ipv6_ext"),
    ]
    for i in range(8):
        n = rnd.randrange(0, 120)
        junk = bytes(rnd.randrange(256) for _ in range(n))
        out.append(Case(f"random bytes {i}", junk, -1, ""))  # any verdict, must not crash
    return out
