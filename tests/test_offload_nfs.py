"""The built-in NFs' offload answers and absorb (no root), and the actor's
offload_decision/absorb: a flow whose later frames the switch handled reads
the same as one that had every frame in Python."""
import copy

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import nf
from nfactor_xdp.dataplane.actor import Actor
from nfactor_xdp.dataplane.nf import NetworkFunction, encode_chain
from nfactor_xdp.dataplane.offload_spec import (DROP, FORWARD, OBSERVE_ALL, OBSERVE_PAYLOAD, TCP_FIN, TCP_RST,
                                                TCP_SYN, ChainOffload, combine,
                                                KernelCounts, Offload)
from nfactor_xdp.dataplane.packet import Packet, classify

CLIENT, SERVER = "10.1.0.5", "10.0.0.2"
SYN_FIN_RST = TCP_SYN | TCP_FIN | TCP_RST


def raw(direction=0, flags="A", proto="tcp", payload=b"x"):
    src, dst, sport, dport = (CLIENT, SERVER, 40000, 80) if direction == 0 else (SERVER, CLIENT, 80, 40000)
    l4 = TCP(sport=sport, dport=dport, flags=flags) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return bytes(Ether() / IP(src=src, dst=dst) / l4 / payload)


def packet(direction=0, flags="A", proto="tcp", payload=b"x", now=0.0):
    f = raw(direction, flags, proto, payload)
    _kind, _key, _d, l4 = classify(f)
    return Packet(memoryview(bytearray(f)), direction, l4, 6 if proto == "tcp" else 17, now)


def make_nf(name, config=None):
    inst = nf.by_name(name)()
    inst.init(config or {})
    return inst


def make_actor(nfs, proto="tcp"):
    _kind, key, d, _l4 = classify(raw(0, proto=proto))
    return Actor(key, d, 0.0, encode_chain([n.type_id for n in nfs]), nfs)


def feed(actor, direction=0, flags="A", proto="tcp", payload=b"x", now=1.0):
    f = raw(direction, flags, proto, payload)
    _kind, _key, d, l4 = classify(f)
    return actor.on_packet(memoryview(bytearray(f)), d, l4, now)


def counts_of(frames, dropped=(), last_seen=None):
    """KernelCounts for `frames` ((direction, size), ...) the switch handled,
    `dropped` being the indexes a bucket dropped (their bytes counted too,
    which struct nfx_offload does not do yet)."""
    packets, nbytes, bdrop, bdrop_bytes = [0, 0], [0, 0], [0, 0], [0, 0]
    for i, (d, size) in enumerate(frames):
        packets[d] += 1
        nbytes[d] += size
        if i in dropped:
            bdrop[d] += 1
            bdrop_bytes[d] += size
    return KernelCounts(tuple(packets), tuple(nbytes), tuple(bdrop), tuple(bdrop_bytes), last_seen=last_seen)


# --- flow_monitor --------------------------------------------------------------
def test_flow_monitor_forwards_and_punts_fin_rst():
    fm = make_nf("flow_monitor")
    st = fm.allocate_flow_state()
    fm.process_packet(packet(), st)
    assert fm.offload(st) == Offload(FORWARD, punt_tcp_flags=TCP_FIN | TCP_RST)


def test_flow_monitor_absorb_reads_as_if_inline():
    fm = make_nf("flow_monitor")
    st = fm.allocate_flow_state()
    for d in (0, 1, 0):
        fm.process_packet(packet(d), st)
    size = len(raw())
    fm.absorb(st, KernelCounts((5, 4), (5 * size, 4 * size)))
    assert fm.summary(st)["packets"] == {"orig": 7, "reply": 5}
    assert fm.summary(st)["bytes"] == {"orig": 7 * size, "reply": 5 * size}


def test_flow_monitor_absorb_moves_last_seen_forward_only(monkeypatch):
    fm = make_nf("flow_monitor")
    st = fm.allocate_flow_state()
    st["last_seen"] = 1000.0
    monkeypatch.setattr("time.time", lambda: 2000.0)
    monkeypatch.setattr("time.monotonic_ns", lambda: 50_000_000_000)
    fm.absorb(st, KernelCounts((1, 0), (60, 0), last_seen=40_000_000_000))  # 10 s ago
    assert st["last_seen"] == pytest.approx(1990.0)
    fm.absorb(st, KernelCounts((1, 0), (60, 0), last_seen=1_000_000_000))   # older than what it has
    assert st["last_seen"] == pytest.approx(1990.0)


def test_absorbing_in_pieces_equals_absorbing_once():
    fm = make_nf("flow_monitor")
    a, b = fm.allocate_flow_state(), fm.allocate_flow_state()
    first = KernelCounts((3, 1), (300, 100))
    total = first + KernelCounts((2, 2), (200, 200))
    fm.absorb(a, total)
    fm.absorb(b, first)
    fm.absorb(b, total - first)
    assert a["packets"] == b["packets"] == [5, 3] and a["bytes"] == b["bytes"] == [500, 300]


# --- firewall ------------------------------------------------------------------------
def run_fw(fw, st, pkts):
    return [fw.process_packet(p, st) for p in pkts]


def test_firewall_udp_allowed_forwards_without_punts():
    fw = make_nf("firewall")
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(proto="udp")])
    assert fw.offload(st) == Offload(FORWARD)


def test_firewall_tcp_answer_follows_conntrack():
    fw = make_nf("firewall")
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(0, "S")])
    assert st["ct"] == "syn_sent" and fw.offload(st) is None  # handed over once established
    run_fw(fw, st, [packet(1, "SA")])
    assert st["ct"] == "syn_recv" and fw.offload(st) is None  # the next bare ACK moves it
    run_fw(fw, st, [packet(0, "A")])
    assert st["ct"] == "established" and fw.offload(st) == Offload(FORWARD, SYN_FIN_RST)
    run_fw(fw, st, [packet(0, "FA")])
    assert st["ct"] == "fin_wait" and fw.offload(st) == Offload(FORWARD, SYN_FIN_RST)
    run_fw(fw, st, [packet(1, "FA")])
    assert st["ct"] == "closing" and fw.offload(st) is None
    run_fw(fw, st, [packet(0, "A")])
    assert st["ct"] == "closed" and fw.offload(st) == Offload(FORWARD, SYN_FIN_RST)


@pytest.mark.parametrize("setup", [["S", "SA", "A"], ["A"], ["S", "SA", "A", "FA"], ["R"],
                                   ["S", "SA", "A", "FA", "FA", "A"]])
def test_firewall_frames_it_does_not_punt_would_not_change_its_state(setup):
    """The claim behind its punt mask: in every state it offloads, a frame
    without SYN, FIN or RST leaves its state as it was."""
    fw = make_nf("firewall")
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(i % 2, f) for i, f in enumerate(setup)])
    spec = fw.offload(st)
    assert spec is not None and spec.action == FORWARD
    for d in (0, 1):
        for flags in ("A", "PA", "", "U", "E"):
            before = copy.deepcopy(st)
            assert fw.process_packet(packet(d, flags), st)
            assert st == before


def test_firewall_denied_flow_drops_and_absorbs_its_drops():
    fw = make_nf("firewall", {"default": "drop"})
    inline, offloaded = fw.allocate_flow_state(), fw.allocate_flow_state()
    pkts = [packet(0, "S"), packet(1, "SA"), packet(0, "A"), packet(1, "A"), packet(0, "PA")]
    run_fw(fw, inline, pkts)
    run_fw(fw, offloaded, pkts[:1])
    assert fw.offload(offloaded) == Offload(DROP)
    fw.absorb(offloaded, counts_of([(1, 60), (0, 60), (1, 60), (0, 60)]))
    assert fw.summary(offloaded) == fw.summary(inline)
    assert inline["dropped"] == 5


def test_firewall_allowed_flow_absorbs_nothing():
    fw = make_nf("firewall")
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(0, "S"), packet(1, "SA"), packet(0, "A")])
    before = copy.deepcopy(st)
    fw.absorb(st, KernelCounts((10, 10), (600, 600)))
    assert st == before


def test_firewall_strict_tcp_after_rst_drops():
    fw = make_nf("firewall", {"strict_tcp": True})
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(0, "S"), packet(1, "R")])
    assert fw.offload(st) == Offload(DROP)
    fw.absorb(st, KernelCounts((2, 0), (120, 0)))
    assert st["dropped"] == 2


def test_firewall_not_offloaded_until_evaluated_under_the_current_config():
    fw = make_nf("firewall")
    st = fw.allocate_flow_state()
    run_fw(fw, st, [packet(proto="udp")])
    fw.init({"default": "allow"})  # a policy change: re-evaluated on the next packet
    assert fw.offload(st) is None
    assert fw.offload(fw.deserialize(fw.serialize(st))) is None
    run_fw(fw, st, [packet(proto="udp")])
    assert fw.offload(st) == Offload(FORWARD)


# --- rate_limiter ----------------------------------------------------------------------
def test_rate_limiter_asks_for_its_buckets():
    rl = make_nf("rate_limiter", {"pps": 1000, "burst": 100})
    assert rl.offload(rl.allocate_flow_state()) == Offload(FORWARD, pps=1000, burst=100)
    rl = make_nf("rate_limiter", {"pps": 10.0, "burst": 5, "bps": 125000})
    assert rl.offload(rl.allocate_flow_state()) == Offload(FORWARD, pps=10, burst=5, bps=125000,
                                                           byte_burst=62500)


@pytest.mark.parametrize("config", [{"pps": 0.5, "burst": 1}, {"pps": 10, "bps": 1000.5},
                                    {"pps": 2.0 ** 33, "burst": 1}])
def test_rate_limiter_rates_the_switch_cannot_keep_are_not_offloaded(config):
    rl = make_nf("rate_limiter", config)
    assert rl.offload(rl.allocate_flow_state()) is None


def test_rate_limiter_absorb_counts_and_empties_its_buckets():
    rl = make_nf("rate_limiter", {"pps": 10, "burst": 5, "bps": 10000, "byte_burst": 5000})
    st = rl.allocate_flow_state()
    assert rl.process_packet(packet(now=100.0), st)
    rl.absorb(st, counts_of([(0, 60), (1, 60), (0, 60), (0, 60)], dropped={3}, last_seen=101_000_000_000))
    assert (st["passed"], st["dropped"]) == (4, 1)
    assert (st["tokens"], st["btokens"], st["last"]) == (0.0, 0.0, 101.0)
    assert not rl.process_packet(packet(now=101.05), st)  # 0.5 token since the switch's last frame
    assert rl.process_packet(packet(now=101.2), st)       # refilled at the rate from there


def test_rate_limiter_absorb_without_frames_keeps_its_buckets():
    rl = make_nf("rate_limiter", {"pps": 10, "burst": 5})
    st = rl.allocate_flow_state()
    rl.absorb(st, KernelCounts())
    assert st["tokens"] == 5 and st["last"] is None


# --- http_parser ------------------------------------------------------------------------------
def test_http_parser_only_observes_and_counts_the_copies_it_never_got():
    hp = make_nf("http_parser")
    st = hp.allocate_flow_state()
    hp.process_packet(packet(0, "S", payload=b""), st)
    assert hp.offload(st) == Offload(FORWARD, observe=OBSERVE_PAYLOAD)
    hp.absorb(st, KernelCounts(observe_lost=(2, 1)))
    assert hp.summary(st)["observe_gaps"] == 3


# --- the actor ----------------------------------------------------------------------------------
def test_actor_without_nfs_forwards_everything():
    a = make_actor([])
    feed(a)
    assert a.offload_decision() == ChainOffload(Offload(FORWARD))


def test_actor_combines_its_chain():
    a = make_actor([make_nf("flow_monitor"), make_nf("firewall"), make_nf("rate_limiter", {"pps": 10, "burst": 5})])
    for d, flags in ((0, "S"), (1, "SA"), (0, "A")):
        feed(a, d, flags)
    decision = a.offload_decision()
    assert decision.spec == Offload(FORWARD, SYN_FIN_RST, pps=10, burst=5) and decision.owner == 2


def test_actor_clears_punts_of_a_flow_that_is_not_tcp():
    a = make_actor([make_nf("flow_monitor")], proto="udp")
    feed(a, proto="udp")
    assert a.offload_decision().spec == Offload(FORWARD)


def test_actor_with_http_parser_is_not_offloaded_unless_its_rule_asks_for_observe_mode():
    a = make_actor([make_nf("flow_monitor"), make_nf("http_parser")])
    feed(a, 0, "S", payload=b"")
    assert a.offload_decision().describe() == \
        "not offloaded: http_parser needs every packet (its rule does not ask for observe mode)"
    observed = a.offload_decision(observe_ok=True)
    assert observed == ChainOffload(Offload(FORWARD, TCP_FIN | TCP_RST, observe=OBSERVE_PAYLOAD), observers=(1,))
    assert observed.describe() == "forward punt FIN|RST observe payload"


def test_observers_get_only_their_lost_copies_and_the_others_no_observe_counts():
    decision = ChainOffload(Offload(FORWARD, observe=OBSERVE_PAYLOAD), observers=(1,))
    counts = KernelCounts(packets=(5, 3), bytes=(500, 300), observed=(4, 2), observe_lost=(1, 0))
    assert decision.counts_for(1, counts) == KernelCounts(observe_lost=(1, 0))
    assert decision.counts_for(0, counts) == KernelCounts(packets=(5, 3), bytes=(500, 300))
    assert decision.counts_for(1, KernelCounts(packets=(1, 0), observed=(1, 0))) == KernelCounts()


def test_an_observer_before_a_bucket_is_not_offloaded_one_after_it_is():
    rl = Offload(FORWARD, pps=10, burst=5)
    obs = Offload(FORWARD, observe=OBSERVE_ALL)
    assert "observes before" in combine([obs, rl], ["hp", "rl"], observe_ok=True).reason
    both = combine([rl, obs], ["rl", "hp"], observe_ok=True)
    assert both.spec == Offload(FORWARD, pps=10, burst=5, observe=OBSERVE_ALL) and both.owner == 0
    assert both.observers == (1,)


def test_actor_drop_does_not_ask_the_nfs_after_it():
    a = make_actor([make_nf("firewall", {"default": "drop"}), make_nf("http_parser")])
    feed(a, 0, "S")
    assert a.offload_decision() == ChainOffload(Offload(DROP), owner=0)


class Raises(NetworkFunction):
    name, type_id = "raises", 11

    def offload(self, state):
        raise RuntimeError("bug")

    def absorb(self, state, counts):
        raise RuntimeError("absorb bug")


def test_actor_an_nf_that_raises_keeps_its_packets():
    a = make_actor([Raises()])
    feed(a)
    assert a.offload_decision() == ChainOffload(None, "raises.offload() raised RuntimeError: bug")


def test_actor_absorb_needs_an_offload_and_survives_an_nf_bug():
    a = make_actor([Raises(), make_nf("flow_monitor")])
    with pytest.raises(ValueError, match="not offloaded"):
        a.absorb(KernelCounts((1, 0), (60, 0)))
    a.offload = ChainOffload(Offload())
    a.absorb(KernelCounts((1, 0), (60, 0)))
    assert a.nf_errors == 1 and "raises.absorb" in a.errors[0]
    assert a.states[1]["packets"] == [1, 0]
    assert a.summary()["offload"] == "forward"


def chain(*names_configs):
    return [make_nf(n, c) for n, c in names_configs]


FRAMES = [(0, "S"), (1, "SA"), (0, "A"), (0, "PA"), (1, "PA"), (1, "PA"), (0, "PA"), (0, "A"), (1, "PA")]


@pytest.mark.parametrize("names_configs, bucket_drops", [
    ((("flow_monitor", None), ("firewall", None)), ()),
    ((("flow_monitor", None), ("firewall", {"default": "drop"})), ()),
    ((("flow_monitor", None), ("rate_limiter", {"pps": 1, "burst": 4})), (1, 2, 3, 4, 5)),
    ((("rate_limiter", {"pps": 1, "burst": 4}), ("flow_monitor", None)), (1, 2, 3, 4, 5)),
])
def test_an_offloaded_flow_reads_as_if_every_frame_came_inline(names_configs, bucket_drops):
    """Frames 0-2 inline, the rest by the switch (as the chain decided,
    the bucket dropping the given ones among them), versus all inline."""
    inline, offloaded = make_actor(chain(*names_configs)), make_actor(chain(*names_configs))
    for d, flags in FRAMES:
        feed(inline, d, flags, now=1.0)
    for d, flags in FRAMES[:3]:
        feed(offloaded, d, flags, now=1.0)
    offloaded.offload = offloaded.offload_decision()
    assert offloaded.offload.spec is not None
    rest = [(d, len(raw(d, flags))) for d, flags in FRAMES[3:]]
    offloaded.absorb(counts_of(rest, dropped=set(bucket_drops), last_seen=1_000_000_000))
    for i, (x, y) in enumerate(zip(inline.nfs, offloaded.nfs)):
        got, want = y.summary(offloaded.states[i]), x.summary(inline.states[i])
        for volatile in ("first_seen", "last_seen", "tokens"):
            got.pop(volatile, None)
            want.pop(volatile, None)
        assert got == want, x.name
    assert (offloaded.packets, offloaded.bytes, offloaded.dropped) == (inline.packets, inline.bytes, inline.dropped)
