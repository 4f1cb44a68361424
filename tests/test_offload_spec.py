"""offload_spec (no root): Offload validation, KernelCounts arithmetic, the
chain's combine rules, and how each NF's share of the counts is computed."""
from types import SimpleNamespace

import pytest

from nfactor_xdp.dataplane.nf import NetworkFunction
from nfactor_xdp.dataplane.offload_spec import (DROP, FORWARD, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
                                                Action, ChainOffload, KernelCounts, Offload, OffloadError,
                                                combine, flag_names)


# --- Offload -----------------------------------------------------------------
def test_values_match_the_kernel():
    assert (int(FORWARD), int(DROP)) == (1, 2)
    assert (TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK) == (0x01, 0x02, 0x04, 0x08, 0x10)


def test_defaults_forward_everything():
    o = Offload()
    assert (o.action, o.punt_tcp_flags, o.pps, o.burst, o.bps, o.byte_burst) == (FORWARD, 0, 0, 0, 0, 0)
    assert not o.has_bucket
    assert o.describe() == "forward"


def test_action_given_as_a_number_becomes_the_enum():
    assert Offload(2).action is Action.DROP


@pytest.mark.parametrize("kwargs, message", [
    ({"action": 0}, "action"),
    ({"action": "forward"}, "action"),
    ({"punt_tcp_flags": 0x100}, "punt_tcp_flags"),
    ({"punt_tcp_flags": -1}, "punt_tcp_flags"),
    ({"punt_tcp_flags": True}, "punt_tcp_flags"),
    ({"pps": 1.5, "burst": 2}, "pps"),
    ({"pps": 10}, "pps/burst"),
    ({"burst": 10}, "pps/burst"),
    ({"bps": 1000}, "bps/byte_burst"),
    ({"pps": 1 << 32, "burst": 1}, "pps"),
    ({"action": DROP, "punt_tcp_flags": TCP_FIN}, "DROP"),
    ({"action": DROP, "pps": 10, "burst": 10}, "DROP"),
])
def test_invalid_specs_are_refused_by_name(kwargs, message):
    with pytest.raises(OffloadError, match=message):
        Offload(**kwargs)
    assert issubclass(OffloadError, ValueError)


def test_buckets_and_describe():
    o = Offload(FORWARD, TCP_FIN | TCP_RST, pps=1000, burst=100, bps=125000, byte_burst=3000)
    assert o.has_bucket and Offload(bps=1, byte_burst=1514).has_bucket
    assert o.describe() == "forward punt FIN|RST 1000pps/100 125000B/s/3000B"
    assert Offload(DROP).describe() == "drop"
    assert flag_names(TCP_SYN | 0x80) == "SYN|0x80"


def test_frozen():
    with pytest.raises(AttributeError):
        Offload().pps = 3


# --- KernelCounts --------------------------------------------------------------
def test_counts_add_subtract_and_truth():
    a = KernelCounts((5, 4), (500, 400), (1, 0), last_seen=100)
    b = KernelCounts((2, 1), (200, 100), (0, 1), last_seen=50)
    s = a + b
    assert (s.packets, s.bytes, s.bucket_dropped, s.last_seen) == ((7, 5), (700, 500), (1, 1), 100)
    d = s - b
    assert d == a
    assert not KernelCounts() and KernelCounts(bucket_dropped=(0, 1))
    assert (a - a).last_seen is None  # nothing came since: no last frame to report
    assert a.forwarded == (4, 4)


def test_counts_going_backwards_or_malformed_are_errors():
    with pytest.raises(OffloadError, match="backwards"):
        KernelCounts((1, 0)) - KernelCounts((2, 0))
    with pytest.raises(OffloadError, match="pair"):
        KernelCounts(packets=(1, 2, 3))
    with pytest.raises(OffloadError, match="integers"):
        KernelCounts(bytes=(1.0, 2))


def test_from_slot_maps_canonical_directions_to_orig_reply():
    slot = SimpleNamespace(packets=(3, 7), bytes=(300, 700), bucket_dropped=(1, 0), last_seen_ns=0)
    lo_first = KernelCounts.from_slot(slot, 0)
    hi_first = KernelCounts.from_slot(slot, 1)
    assert lo_first.packets == (3, 7) and lo_first.last_seen is None
    assert (hi_first.packets, hi_first.bytes, hi_first.bucket_dropped) == ((7, 3), (700, 300), (0, 1))


def test_last_seen_on_the_wall_clock():
    c = KernelCounts((1, 0), (60, 0), last_seen=9_000_000_000)
    assert c.last_seen_wall(wall=1000.0, mono_ns=10_000_000_000) == pytest.approx(999.0)
    assert KernelCounts().last_seen_wall() is None


# --- combine -----------------------------------------------------------------------
def test_an_empty_chain_forwards_everything():
    c = combine([])
    assert c.spec == Offload(FORWARD) and c.owner == -1 and c.reason == ""


def test_any_none_means_not_offloaded_with_its_name():
    c = combine([Offload(), None, Offload()], ["flow_monitor", "http_parser", "firewall"])
    assert c.spec is None and c.reason == "http_parser needs every packet"
    assert c.describe() == "not offloaded: http_parser needs every packet"


def test_punt_masks_are_ored():
    c = combine([Offload(punt_tcp_flags=TCP_FIN | TCP_RST), Offload(punt_tcp_flags=TCP_SYN | TCP_RST)])
    assert c.spec == Offload(FORWARD, TCP_FIN | TCP_SYN | TCP_RST)


def test_drop_wins_without_punts_and_ends_the_chain():
    c = combine([Offload(punt_tcp_flags=TCP_FIN), Offload(DROP), None, Offload(pps=1, burst=1)])
    assert c.spec == Offload(DROP) and c.owner == 1  # the NFs after a drop never see a frame


def test_one_bucket_is_kept_with_its_owner():
    c = combine([Offload(punt_tcp_flags=TCP_RST), Offload(pps=10, burst=5, bps=1000, byte_burst=2000)])
    assert c.spec == Offload(FORWARD, TCP_RST, 10, 5, 1000, 2000) and c.owner == 1


def test_two_buckets_are_refused_with_a_reason():
    c = combine([Offload(pps=10, burst=5), Offload(), Offload(bps=10, byte_burst=2000)],
                ["rate_limiter", "flow_monitor", "shaper"])
    assert c.spec is None and c.reason == "two buckets (rate_limiter, shaper)"


def test_a_bucket_before_a_drop_is_refused():
    c = combine([Offload(pps=10, burst=5), Offload(DROP)], ["rate_limiter", "firewall"])
    assert c.spec is None and "rate_limiter's bucket comes before firewall's drop" in c.reason


def test_an_answer_that_is_not_an_offload_is_refused():
    c = combine([{"action": 1}], ["odd"])
    assert c.spec is None and "odd.offload() returned a dict" in c.reason


def test_a_third_party_nf_without_offload_is_never_offloaded():
    class ThirdParty(NetworkFunction):
        name, type_id = "third_party", 12

    tp = ThirdParty()
    assert tp.offload(tp.allocate_flow_state()) is None
    assert combine([tp.offload({})], ["third_party"]).spec is None
    tp.absorb({}, KernelCounts((1, 1), (1, 1)))  # the default absorbs nothing, and does not fail


# --- each NF's share ------------------------------------------------------------------
COUNTS = KernelCounts((10, 6), (1000, 600), (3, 1), (300, 100), last_seen=5)


def test_without_an_owner_every_nf_gets_the_counts():
    c = combine([Offload(), Offload()])
    assert c.counts_for(0, COUNTS) is COUNTS and c.counts_for(1, COUNTS) is COUNTS


def test_shares_around_a_bucket():
    c = ChainOffload(Offload(pps=1, burst=1), owner=1)
    before, owner, after = (c.counts_for(i, COUNTS) for i in range(3))
    assert before == KernelCounts((10, 6), (1000, 600), last_seen=5)  # saw all, dropped none
    assert owner is COUNTS
    assert after == KernelCounts((7, 5), (700, 500), last_seen=5)       # only what the bucket passed


def test_shares_around_a_drop():
    c = ChainOffload(Offload(DROP), owner=1)
    drops = KernelCounts((4, 2), (400, 200), last_seen=5)
    assert c.counts_for(0, drops) == drops and c.counts_for(1, drops) is drops
    assert not c.counts_for(2, drops)
