"""The runtime's frame parser (no root): classification of every crafted
frame, canonical keys shared by both directions."""
import struct

import pytest

from nfactor_xdp.kern.layouts import FlowKeyStruct
from nfactor_xdp.formats.flowkey import KEY_SIZE, FlowKey, describe
from nfactor_xdp.dataplane.packet import DROP, FLOW, HI_TO_LO, LO_TO_HI, OTHER, Packet, classify
from tests.frames import cases

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_classification(case):
    kind, key, direction, l4 = classify(case.frame)
    if case.kind < 0:
        assert kind in (FLOW, OTHER, DROP)
        return
    assert kind == case.kind
    if kind == FLOW:
        assert len(key) == KEY_SIZE
        assert direction in (LO_TO_HI, HI_TO_LO)
    else:
        assert key is None


@pytest.mark.parametrize("case", [c for c in CASES if c.reverse], ids=lambda c: c.name)
def test_both_directions_share_a_key(case):
    k1, d1 = classify(case.frame)[1:3]
    k2, d2 = classify(case.reverse)[1:3]
    assert k1 == k2
    assert d1 != d2


def test_key_layout_matches_struct():
    kind, key, direction, _ = classify(CASES[0].frame)  # tcp4 10.77.0.1:40000 -> 10.77.0.2:80
    ck = FlowKeyStruct.from_buffer_copy(key)
    assert bytes(ck.lo_addr)[12:] == bytes([10, 77, 0, 1]) and bytes(ck.hi_addr)[12:] == bytes([10, 77, 0, 2])
    assert ck.proto == 6 and bytes(ck.pad) == b"\0\0\0" and ck.vlan_outer == ck.vlan_inner == 0
    decoded = FlowKey.from_bytes(bytes(ck))
    assert (decoded.lo_addr, decoded.lo_port) == ("10.77.0.1", 40000)
    assert (decoded.hi_addr, decoded.hi_port) == ("10.77.0.2", 80)
    assert decoded.proto == 6
    assert direction == LO_TO_HI
    assert struct.unpack("!H", bytes(key[32:34]))[0] == 40000


def test_ports_order_breaks_address_ties():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    a = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.1") / UDP(sport=9, dport=8))
    kind, key, direction, _ = classify(a)
    assert kind == FLOW and direction == HI_TO_LO
    d = FlowKey.from_bytes(key)
    assert (d.lo_port, d.hi_port) == (8, 9)


def test_memoryview_input_is_accepted():
    frame = CASES[0].frame
    assert classify(memoryview(bytearray(frame)))[:3] == classify(frame)[:3]


def test_flow_given_as_a_five_tuple_names_the_same_key():
    from nfactor_xdp.formats.flowkey import parse as parse_flow
    raw = CASES[0].frame  # tcp4 10.77.0.1:40000 -> 10.77.0.2:80
    key = classify(raw)[1]
    assert parse_flow("tcp 10.77.0.1:40000 10.77.0.2:80") == key
    assert parse_flow("tcp 10.77.0.2:80 <-> 10.77.0.1:40000") == key
    assert parse_flow(key.hex()) == key
    v6 = next(c for c in CASES if c.name == "udp6")
    assert parse_flow("udp [fd77::1]:6000 [fd77::2]:7000") == classify(v6.frame)[1]
    import pytest as _pytest
    with _pytest.raises(ValueError, match="tcp|udp"):
        parse_flow("icmp 1.2.3.4:1 5.6.7.8:2")


def _case(name):
    return next(c for c in CASES if c.name == name)


def test_a_vid_0_tag_names_the_untagged_flow_and_other_vids_their_own():
    """Linux hosts take a VID-0 (priority) tag as untagged: so does the key."""
    untagged, prio = classify(_case("tcp4").frame), classify(_case("vlan 0 (priority tag) tcp").frame)
    assert prio[:3] == untagged[:3] and prio[3] == untagged[3] + 4
    k5 = classify(_case("vlan tagged tcp").frame)[1]
    qinq = classify(_case("qinq 802.1ad+802.1Q udp6").frame)[1]
    ck5, ckq = FlowKeyStruct.from_buffer_copy(k5), FlowKeyStruct.from_buffer_copy(qinq)
    assert (ck5.vlan_outer, ck5.vlan_inner) == (0x0500, 0)  # network order in the struct, like ports
    assert (FlowKey.from_bytes(qinq).vlan_outer, FlowKey.from_bytes(qinq).vlan_inner) == (100, 200)
    assert ckq.vlan_outer == 100 << 8 and ckq.vlan_inner == 200 << 8
    assert describe(qinq) == "udp [fd77::1]:1 <-> [fd77::2]:2 vlan 100.200"
    assert describe(k5) == "tcp 10.77.0.1:20 <-> 10.77.0.2:80 vlan 5"


def test_flows_of_other_protocols_and_tags_parse_back_to_their_keys():
    from nfactor_xdp.formats.flowkey import FlowKeyError, parse as parse_flow
    for name in ("gre", "gre6", "esp6 behind hop-by-hop", "qinq 802.1ad+802.1Q udp6", "vlan tagged tcp",
                 "802.1ad tagged gre", "ipv6 no next header"):
        key = classify(_case(name).frame)[1]
        assert parse_flow(describe(key)) == key, name
    assert describe(classify(_case("gre").frame)[1]) == "gre 10.77.0.1 <-> 10.77.0.2"
    assert parse_flow("47 10.77.0.2 10.77.0.1") == classify(_case("gre").frame)[1]
    for bad in ("gre 10.77.0.1 10.77.0.2 vlan 4096", "tcp 1.2.3.4:1 5.6.7.8:2 vlan x", "icmpv6 fd77::1 fd77::2"):
        with pytest.raises(FlowKeyError):
            parse_flow(bad)


def test_packet_reads_tagged_frames_and_other_protocols():
    kind, key, d, l4 = classify(_case("double 802.1Q tcp4").frame)
    p = Packet(_case("double 802.1Q tcp4").frame, 0, l4, key[36])
    assert (p.l3, p.ip_version, p.src, p.dst, p.sport, p.dport) == (22, 4, "10.77.0.1", "10.77.0.2", 22, 2222)
    assert p.ip_end == len(_case("double 802.1Q tcp4").frame) and p.payload == b""
    frame = _case("esp6 behind hop-by-hop").frame
    kind, key, d, l4 = classify(frame)
    p = Packet(frame, 0, l4, key[36])
    assert (p.proto, p.sport, p.dport, p.seq, p.tcp_flags) == (50, 0, 0, 0, 0)
    assert bytes(p.payload) == b"\3" * 16  # a protocol without ports: its header is payload


@pytest.mark.parametrize("name", ["vlan tagged tcp", "qinq 802.1ad+802.1Q udp6", "double 802.1Q tcp4", "gre",
                                  "802.1ad tagged gre", "esp6 behind hop-by-hop", "vlan 0 (priority tag) tcp"])
def test_a_marker_carries_its_flows_tags_and_parses_to_its_key(name):
    """The switch agent injects a marker only if it parses to the flow's key."""
    from nfactor_xdp.control.switch_agent import parse_move
    from nfactor_xdp.formats import marker
    key = classify(_case(name).frame)[1]
    for orig_dir in (LO_TO_HI, HI_TO_LO):
        frame = marker.frame(key, orig_dir, marker.payload(7))
        kind, mkey, mdir, l4 = classify(frame)
        assert (kind, mkey, mdir) == (FLOW, key, orig_dir)
        assert marker.is_marker(frame, l4, marker.payload(7))
        assert parse_move({"key": key.hex(), "to": 1, "from": 0, "marker": frame.hex()}).marker == frame
