"""The firewall NF (no root): ordered rules matched on the flow's first-packet
orientation, sticky drops, re-evaluation on config change, TCP connection
tracking, strict_tcp, config errors and state migration."""
import importlib
import json

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import nf
from nfactor_xdp.dataplane.packet import FLOW, Packet, classify
from nfactor_xdp.dataplane.nf import NFError
from nfs.firewall import Firewall

CLIENT, SERVER = "10.1.0.5", "10.0.0.2"


def packet(l3, l4, direction, now=0.0):
    frame = bytes(Ether() / l3 / l4)
    kind, _key, _d, off = classify(frame)
    assert kind == FLOW
    return Packet(memoryview(bytearray(frame)), direction, off, 6 if isinstance(l4, TCP) else 17, now)


class Conn:
    """A flow as its two ends see it: orig() from the first packet's sender."""

    def __init__(self, a=CLIENT, b=SERVER, aport=40000, bport=80, proto="tcp", v6=False):
        self.a, self.b, self.aport, self.bport, self.proto, self.v6 = a, b, aport, bport, proto, v6

    def _pkt(self, src, dst, sport, dport, flags, direction):
        l3 = (IPv6 if self.v6 else IP)(src=src, dst=dst)
        l4 = TCP(sport=sport, dport=dport, flags=flags) if self.proto == "tcp" else UDP(sport=sport, dport=dport)
        return packet(l3, l4 / b"x", direction)

    def orig(self, flags="A"):
        return self._pkt(self.a, self.b, self.aport, self.bport, flags, 0)

    def reply(self, flags="A"):
        return self._pkt(self.b, self.a, self.bport, self.aport, flags, 1)


def firewall(config=None):
    fw = Firewall()
    fw.init(config or {})
    return fw


def run(fw, state, pkts):
    return [fw.process_packet(p, state) for p in pkts]


def handshake(c):
    return [c.orig("S"), c.reply("SA"), c.orig("A")]


# --- registry -----------------------------------------------------------------
def test_registered_by_name_and_type_id(monkeypatch):
    # by_name() imports every builtin NF module: load only this one, so the
    # test does not depend on the other NFs being present
    real = nf.load_modules
    monkeypatch.setattr(nf, "load_modules", lambda modules=("nfs.firewall",): real(modules))
    assert nf.by_name("firewall") is Firewall
    assert nf.by_id(2) is Firewall
    assert Firewall.type_id == 2 and Firewall.name == "firewall"
    assert importlib.import_module("nfs.firewall").Firewall is Firewall


# --- verdicts -------------------------------------------------------------------
def test_allows_by_default():
    fw, c = firewall(), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c) + [c.reply("PA")]) == [True] * 4
    assert (st["verdict"], st["rule"], st["reason"], st["dropped"]) == ("allow", -1, "default", 0)


def test_default_drop():
    fw = firewall({"default": "drop"})
    st = fw.allocate_flow_state()
    assert run(fw, st, [Conn(proto="udp").orig()] * 2) == [False, False]
    assert (st["verdict"], st["reason"], st["dropped"]) == ("drop", "default", 2)


DROP_WEB = {"rules": [{"dst": "10.0.0.0/24", "proto": "tcp", "dport": "80", "action": "drop"}]}


def test_drop_rule_by_dst_prefix_and_dport():
    fw = firewall(DROP_WEB)
    st = fw.allocate_flow_state()
    c = Conn()
    assert run(fw, st, [c.orig("S"), c.reply("SA"), c.orig("S")]) == [False] * 3
    assert (st["verdict"], st["rule"], st["reason"], st["dropped"]) == ("drop", 0, "rule", 3)
    other = fw.allocate_flow_state()  # another port of the server: allowed
    assert fw.process_packet(Conn(bport=443).orig("S"), other)
    assert (other["verdict"], other["rule"]) == ("allow", -1)


def test_rule_matches_a_reply_packet_in_the_flows_orientation():
    # a flow allowed at first; the drop rule arrives; its next packet is a reply
    # (10.0.0.2:80 -> client): src/dst and ports are swapped back before matching
    fw, c = firewall(), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c)) == [True] * 3
    fw.init(DROP_WEB)
    assert fw.process_packet(c.reply("PA"), st) is False
    assert (st["verdict"], st["rule"]) == ("drop", 0)
    assert fw.process_packet(c.orig("A"), st) is False


def test_rule_on_the_reply_orientation_does_not_match():
    # "src 10.0.0.2 sport 80" describes flows the server starts from port 80,
    # not the replies of a connection to it
    fw = firewall({"rules": [{"src": SERVER, "sport": 80, "action": "drop"}]})
    c = Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c) + [c.reply("PA")]) == [True] * 4
    served = fw.allocate_flow_state()  # a flow the server does start from port 80
    assert fw.process_packet(Conn(a=SERVER, b=CLIENT, aport=80, bport=40000).orig("S"), served) is False


def test_first_match_wins():
    fw = firewall({"rules": [
        {"src": "10.1.0.0/16", "dport": 80, "action": "allow"},
        {"dst": "10.0.0.0/24", "action": "drop"},
        {"dst": "10.0.0.2", "action": "allow"},
    ]})
    st1, st2 = fw.allocate_flow_state(), fw.allocate_flow_state()
    assert fw.process_packet(Conn(a="10.1.9.9").orig("S"), st1)
    assert (st1["verdict"], st1["rule"]) == ("allow", 0)
    assert not fw.process_packet(Conn(a="10.2.9.9").orig("S"), st2)
    assert (st2["verdict"], st2["rule"]) == ("drop", 1)


def test_ipv6_rule():
    fw = firewall({"rules": [{"dst": "fd00:1::/64", "proto": "udp", "dport": "5000-5010",
                              "action": "drop"}]})
    st, other = fw.allocate_flow_state(), fw.allocate_flow_state()
    c = Conn(a="fd00:2::1", b="fd00:1::7", bport=5003, proto="udp", v6=True)
    assert run(fw, st, [c.orig(), c.reply()]) == [False, False]
    assert fw.process_packet(Conn(a="fd00:2::1", b="fd00:1::7", bport=5011, proto="udp", v6=True).orig(),
                             other)
    v4 = fw.allocate_flow_state()  # a v6 rule never matches v4
    assert fw.process_packet(Conn(proto="udp", bport=5003).orig(), v4)


# --- config changes -----------------------------------------------------------------
def test_drop_is_sticky_across_a_config_change():
    fw, c = firewall(DROP_WEB), Conn()
    st = fw.allocate_flow_state()
    assert not fw.process_packet(c.orig("S"), st)
    fw.init({"rules": [], "default": "allow"})
    assert run(fw, st, [c.orig("S"), c.reply("SA")]) == [False, False]
    assert (st["verdict"], st["rule"], st["dropped"]) == ("drop", 0, 3)


def test_config_change_to_drop_applies_to_an_existing_flow():
    fw, c = firewall({"rules": [{"dport": 80, "action": "allow"}]}), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c)) == [True] * 3
    assert (st["rule"], st["reason"]) == (0, "rule")
    fw.init({"rules": [{"dport": 80, "action": "drop"}]})
    assert fw.process_packet(c.orig("PA"), st) is False
    assert (st["verdict"], st["rule"], st["dropped"]) == ("drop", 0, 1)


def test_config_change_that_still_allows_updates_the_rule():
    fw, c = firewall(), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c)) == [True] * 3
    fw.init({"rules": [{"dport": 22, "action": "drop"}, {"proto": "tcp", "action": "allow"}]})
    assert fw.process_packet(c.reply("PA"), st)
    assert (st["verdict"], st["rule"], st["reason"], st["cfg"]) == ("allow", 1, "rule", fw.version)


def test_version_counts_inits_and_a_bad_config_changes_nothing():
    fw = Firewall()
    assert fw.version == 0
    fw.init(DROP_WEB)
    fw.init(DROP_WEB)
    assert fw.version == 2
    with pytest.raises(NFError):
        fw.init({"rules": [{"dport": 22, "action": "allow"}, {"dport": "ssh", "action": "drop"}]})
    assert fw.version == 2 and fw.config == DROP_WEB and len(fw.rules) == 1
    st = fw.allocate_flow_state()
    assert not fw.process_packet(Conn().orig("S"), st)


@pytest.mark.parametrize("config, message", [
    ("drop everything", r"firewall: config must be an object"),
    ({"rule": []}, r"firewall: unknown config keys \['rule'\]"),
    ({"rules": {"dport": 80}}, r"firewall\.rules: must be a list"),
    ({"rules": [{"action": "drop"}, "x"]}, r"firewall\.rules\[1\]: must be an object"),
    ({"rules": [{"port": 80, "action": "drop"}]}, r"firewall\.rules\[0\]: unknown fields \['port'\]"),
    ({"rules": [{"dport": 80}]}, r"firewall\.rules\[0\]\.action: missing"),
    ({"rules": [{"action": "deny"}]}, r"firewall\.rules\[0\]\.action: 'deny' is not allow or drop"),
    ({"rules": [{"action": "drop"}, {"dst": "10.0.0.300", "action": "drop"}]},
     r"firewall\.rules\[1\]\.dst: '10\.0\.0\.300' is not an address"),
    ({"rules": [{"src": "banana", "action": "drop"}]}, r"firewall\.rules\[0\]\.src"),
    ({"rules": [{"dport": "http", "action": "drop"}]}, r"firewall\.rules\[0\]\.dport: 'http' is not a port"),
    ({"rules": [{"sport": "90-80", "action": "drop"}]}, r"firewall\.rules\[0\]\.sport: .*reversed"),
    ({"rules": [{"proto": "icmp", "action": "drop"}]}, r"firewall\.rules\[0\]\.proto: 'icmp': ICMP is not a flow"),
    ({"rules": [{"proto": "banana", "action": "drop"}]}, r"firewall\.rules\[0\]\.proto: 'banana' is not an IP proto"),
    ({"rules": [{"proto": 256, "action": "drop"}]}, r"firewall\.rules\[0\]\.proto: 256 is not an IP protocol"),
    ({"rules": [{"src": "fd00::/8", "dst": "10.0.0.0/8", "action": "drop"}]},
     r"firewall\.rules\[0\]: src and dst are of different IP versions"),
    ({"default": "reject"}, r"firewall\.default: 'reject' is not allow or drop"),
    ({"strict_tcp": "yes"}, r"firewall\.strict_tcp: 'yes' is not true or false"),
])
def test_bad_config_is_a_clear_error(config, message):
    with pytest.raises(NFError, match=message):
        Firewall().init(config)
    assert issubclass(NFError, ValueError)


def test_empty_configs_are_defaults():
    for config in (None, {}, {"rules": None}):
        fw = firewall(config)
        assert (fw.rules, fw.default, fw.strict_tcp) == ((), "allow", False)


# --- connection tracking ------------------------------------------------------------
def ct_trace(fw, c, steps):
    st = fw.allocate_flow_state()
    out = []
    for side, flags in steps:
        ok = fw.process_packet(getattr(c, side)(flags), st)
        out.append((st["ct"], ok))
    return st, out


def test_conntrack_handshake_and_fin_close():
    fw, c = firewall(), Conn()
    st, trace = ct_trace(fw, c, [
        ("orig", "S"), ("reply", "SA"), ("orig", "A"),
        ("orig", "PA"), ("reply", "PA"),
        ("orig", "FA"), ("reply", "A"), ("reply", "PA"),   # half close: the server still sends
        ("reply", "FA"), ("orig", "A"),
    ])
    assert trace == [(s, True) for s in (
        "syn_sent", "syn_recv", "established", "established", "established",
        "fin_wait", "fin_wait", "fin_wait", "closing", "closed")]
    assert st["seen"] == 3
    assert fw.summary(st)["reset"] is False and fw.summary(st)["midstream"] is False


def test_conntrack_rst_closes_and_a_new_syn_reopens():
    fw, c = firewall(), Conn()
    st, trace = ct_trace(fw, c, [("orig", "S"), ("reply", "SA"), ("orig", "A"), ("reply", "RA"),
                                 ("orig", "A"), ("orig", "S"), ("reply", "SA"), ("orig", "A")])
    assert [s for s, _ in trace] == ["syn_sent", "syn_recv", "established", "closed", "closed",
                                     "syn_sent", "syn_recv", "established"]
    assert all(ok for _, ok in trace)  # not strict: nothing is dropped
    assert st["seen"] == 0


def test_conntrack_refused_connection():
    fw, c = firewall(), Conn()
    st, trace = ct_trace(fw, c, [("orig", "S"), ("reply", "RA")])
    assert trace[-1] == ("closed", True) and fw.summary(st)["reset"] is True


def test_conntrack_out_of_order_flags_do_not_advance():
    fw, c = firewall(), Conn()
    _, trace = ct_trace(fw, c, [("orig", "S"), ("orig", "A"), ("orig", "S"), ("reply", "SA"),
                                ("reply", "A"), ("reply", "SA"), ("orig", "A")])
    assert [s for s, _ in trace] == ["syn_sent", "syn_sent", "syn_sent", "syn_recv", "syn_recv",
                                     "syn_recv", "established"]


def test_midstream_pickup_when_not_strict():
    fw, c = firewall(), Conn()
    st, trace = ct_trace(fw, c, [("orig", "PA"), ("reply", "A"), ("reply", "FA")])
    assert trace == [("established", True), ("established", True), ("fin_wait", True)]
    assert fw.summary(st)["midstream"] is True


def test_udp_state():
    fw, c = firewall(), Conn(proto="udp", bport=53)
    st = fw.allocate_flow_state()
    assert run(fw, st, [c.orig(), c.reply()]) == [True, True]
    assert st["ct"] == "udp"


def test_tcp_fragments_are_untracked():
    fw = firewall({"strict_tcp": True})
    st = fw.allocate_flow_state()
    frame = bytes(Ether() / IP(src=CLIENT, dst=SERVER, flags="MF", proto=6) / (b"\0" * 40))
    kind, _key, _d, l4 = classify(frame)
    assert kind == FLOW and l4 == -1
    assert fw.process_packet(Packet(memoryview(bytearray(frame)), 0, l4, 6), st)
    assert (st["ct"], st["verdict"]) == ("untracked", "allow")


# --- strict_tcp ----------------------------------------------------------------------
@pytest.mark.parametrize("first", ["A", "PA", "SA", "F", "R", "SF"])
def test_strict_drops_a_flow_not_starting_with_a_bare_syn(first):
    fw, c = firewall({"strict_tcp": True}), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, [c.orig(first), c.reply("A"), c.orig("S")]) == [False] * 3
    assert (st["verdict"], st["reason"], st["rule"], st["dropped"]) == ("drop", "invalid", -1, 3)


def test_strict_allows_a_handshake_and_ignores_udp():
    fw, c = firewall({"strict_tcp": True}), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c) + [c.orig("FA"), c.reply("FA"), c.orig("A")]) == [True] * 6
    u = fw.allocate_flow_state()
    assert fw.process_packet(Conn(proto="udp").reply(), u)


def test_strict_drops_packets_after_rst():
    fw, c = firewall({"strict_tcp": True}), Conn()
    st = fw.allocate_flow_state()
    assert run(fw, st, handshake(c) + [c.reply("R"), c.orig("A"), c.orig("S")]) == \
        [True, True, True, True, False, False]
    assert (st["ct"], st["dropped"], st["verdict"]) == ("closed", 2, "allow")


def test_turning_strict_on_drops_midstream_flows():
    fw, c = firewall(), Conn()
    picked, clean = fw.allocate_flow_state(), fw.allocate_flow_state()
    assert fw.process_packet(c.orig("PA"), picked)
    assert run(fw, clean, handshake(Conn(aport=40001))) == [True] * 3
    fw.init({"strict_tcp": True})
    assert not fw.process_packet(c.reply("A"), picked)
    assert (picked["verdict"], picked["reason"]) == ("drop", "invalid")
    assert fw.process_packet(Conn(aport=40001).reply("PA"), clean)


# --- migration ---------------------------------------------------------------------
def test_round_trip_keeps_verdict_and_conntrack():
    fw, c = firewall({"rules": [{"dport": 80, "action": "allow"}]}), Conn()
    st = fw.allocate_flow_state()
    run(fw, st, handshake(c) + [c.orig("FA")])
    data = fw.serialize(st)
    assert isinstance(data, bytes)
    there = firewall({"rules": [{"dport": 80, "action": "allow"}]})
    st2 = there.deserialize(data)
    assert {k: st2[k] for k in ("verdict", "rule", "reason", "ct", "seen", "dropped")} == \
        {k: st[k] for k in ("verdict", "rule", "reason", "ct", "seen", "dropped")}
    assert st2["cfg"] == -1  # re-evaluated against the receiving NF's config
    assert there.process_packet(c.reply("FA"), st2)
    assert (st2["ct"], st2["cfg"], st2["rule"]) == ("closing", there.version, 0)
    assert there.process_packet(c.orig("A"), st2) and st2["ct"] == "closed"


def test_round_trip_keeps_a_sticky_drop():
    fw, c = firewall(DROP_WEB), Conn()
    st = fw.allocate_flow_state()
    assert not fw.process_packet(c.orig("S"), st)
    there = firewall()  # allows everything
    st2 = there.deserialize(fw.serialize(st))
    assert run(there, st2, [c.orig("S"), c.reply("SA")]) == [False, False]
    assert (st2["verdict"], st2["rule"], st2["dropped"]) == ("drop", 0, 3)


def test_round_trip_of_a_fresh_state_and_tolerance_of_missing_keys():
    fw = firewall()
    assert fw.deserialize(fw.serialize(fw.allocate_flow_state())) == fw.allocate_flow_state()
    import msgpack
    st = fw.deserialize(msgpack.packb({"verdict": "drop", "extra": 1}))
    assert st["verdict"] == "drop" and st["dropped"] == 0 and "extra" not in st
    with pytest.raises(ValueError):
        fw.deserialize(msgpack.packb([1, 2]))


def test_summary_is_json():
    fw, c = firewall(DROP_WEB), Conn()
    st = fw.allocate_flow_state()
    fw.process_packet(c.orig("S"), st)
    s = fw.summary(st)
    assert json.loads(json.dumps(s)) == s
    assert s == {"verdict": "drop", "rule": 0, "reason": "rule", "conntrack": "syn_sent", "dropped": 1,
                 "midstream": False, "reset": False}
    st2 = fw.deserialize(fw.serialize(st))
    assert json.loads(json.dumps(fw.summary(st2))) == s
    assert json.dumps(fw.summary(fw.allocate_flow_state()))
