"""The NF API: registry, chain encoding, default serialization, the actor's
chain semantics (order, first False stops, NF errors counted), flow_monitor."""
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import nf
from nfactor_xdp.dataplane.actor import Actor
from nfactor_xdp.dataplane.nf import NetworkFunction, NFError, decode_chain, encode_chain, register
from nfactor_xdp.dataplane.packet import classify


def frame(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=80, payload=b"", proto="tcp", flags="A"):
    l4 = TCP(sport=sport, dport=dport, flags=flags) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return bytes(Ether() / IP(src=src, dst=dst) / l4 / payload)


def feed(actor, raw, now=1.0):
    kind, key, d, l4 = classify(raw)
    return actor.on_packet(memoryview(bytearray(raw)), d, l4, now)


def make_actor(names, raw):
    kind, key, d, l4 = classify(raw)
    nfs = []
    for n in names:
        inst = nf.by_name(n)()
        inst.init({})
        nfs.append(inst)
    return Actor(key, d, 0.0, encode_chain(names), nfs)


def test_builtins_are_registered_with_their_ids():
    assert nf.known() == {"firewall": 2, "flow_monitor": 1, "http_parser": 3, "rate_limiter": 4}


def test_chain_encoding_low_nibble_first():
    assert encode_chain(["flow_monitor", "firewall", "http_parser"]) == 0x321
    assert decode_chain(0x321) == [1, 2, 3]
    assert decode_chain(0) == []
    assert encode_chain([]) == 0


@pytest.mark.parametrize("bad", [1 << 64, -1, 0x301])
def test_bad_chains_are_rejected(bad):
    with pytest.raises(NFError):
        decode_chain(bad)


def test_unknown_nf_name_is_a_clear_error():
    with pytest.raises(NFError, match="unknown NF 'nope'"):
        encode_chain(["nope"])


def test_registry_refuses_bad_and_clashing_nfs():
    class NoId(NetworkFunction):
        name = "noid"
    with pytest.raises(NFError, match="type_id"):
        register(NoId)

    class Clash(NetworkFunction):
        name, type_id = "clash", 1
    with pytest.raises(NFError, match="taken"):
        register(Clash)


class Obj:
    def __init__(self):
        self.n = 0
        self.seen = []


class ObjNF(NetworkFunction):
    name, type_id = "objnf", 15

    def allocate_flow_state(self):
        return Obj()


def test_default_serialization_of_dicts_and_objects():
    fm = nf.by_name("flow_monitor")()
    st = fm.allocate_flow_state()
    st["packets"][0] = 5
    assert fm.deserialize(fm.serialize(st)) == st
    o = ObjNF()
    s = o.allocate_flow_state()
    s.n, s.seen = 3, ["a"]
    back = o.deserialize(o.serialize(s))
    assert isinstance(back, Obj) and back.n == 3 and back.seen == ["a"]


class Stop(NetworkFunction):
    name, type_id = "stopper", 14
    calls = 0

    def process_packet(self, pkt, state):
        Stop.calls += 1
        return False


class Boom(NetworkFunction):
    name, type_id = "boom", 13

    def process_packet(self, pkt, state):
        raise RuntimeError("bug")


def test_chain_runs_in_order_and_stops_at_first_false():
    register(Stop)
    raw = frame()
    a = make_actor(["flow_monitor", "stopper", "flow_monitor"], raw)
    assert feed(a, raw) is False
    assert a.states[0]["packets"] == [1, 0]
    assert a.states[2]["packets"] == [0, 0]  # never reached
    assert a.dropped == 1


def test_an_nf_exception_drops_and_counts_never_raises():
    register(Boom)
    raw = frame()
    a = make_actor(["boom"], raw)
    assert feed(a, raw) is False
    assert a.nf_errors == 1 and "RuntimeError: bug" in a.errors[0]
    assert a.summary()["nf_errors"] == 1


def test_flow_monitor_counts_per_direction():
    fwd = frame(payload=b"x" * 10)
    rev = frame(src="10.0.0.2", dst="10.0.0.1", sport=80, dport=1000)
    a = make_actor(["flow_monitor"], fwd)
    for _ in range(3):
        feed(a, fwd)
    feed(a, rev)
    st = a.summary()["nfs"]["flow_monitor"]
    assert st["packets"] == {"orig": 3, "reply": 1}
    assert st["bytes"]["orig"] == 3 * len(fwd)


def test_tcp_fin_both_ways_or_rst_closes_the_actor():
    a = make_actor([], frame())
    feed(a, frame(flags="FA"), now=2.0)
    assert not a.closed_at
    feed(a, frame(src="10.0.0.2", dst="10.0.0.1", sport=80, dport=1000, flags="FA"), now=3.0)
    assert a.closed_at == 3.0
    b = make_actor([], frame())
    feed(b, frame(flags="R"), now=5.0)
    assert b.closed_at == 5.0
