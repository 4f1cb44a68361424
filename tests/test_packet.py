"""The runtime's frame parser (no root): classification of every crafted
frame, canonical keys shared by both directions."""
import struct

import pytest

from nfactor_xdp.kern.layouts import FlowKeyStruct
from nfactor_xdp.formats.flowkey import FlowKey
from nfactor_xdp.dataplane.packet import DROP, FLOW, HI_TO_LO, LO_TO_HI, OTHER, classify
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
        assert len(key) == 40
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
    assert ck.proto == 6 and bytes(ck.pad) == b"\0\0\0"
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
