"""The rate limiter NF (no root): a token bucket per flow driven by pkt.now,
an optional byte bucket, config errors and state migration."""
import json

import msgpack
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import nf
from nfactor_xdp.dataplane.packet import FLOW, Packet, classify
from nfactor_xdp.dataplane.nf import NFError
from nfs.rate_limiter import RateLimiter


def frame(size=100):
    f = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000) / (b"x" * (size - 42)))
    assert len(f) == size
    return f


def packet(now, size=100, direction=0):
    f = frame(size)
    kind, _key, _d, l4 = classify(f)
    assert kind == FLOW
    return Packet(memoryview(bytearray(f)), direction, l4, 17, now)


def limiter(**config):
    rl = RateLimiter()
    rl.init(config)
    return rl


def send(rl, st, now, n, size=100):
    return sum(rl.process_packet(packet(now, size, i % 2), st) for i in range(n))


def test_registered_by_name_and_type_id(monkeypatch):
    real = nf.load_modules  # load only this NF module (see test_nf_firewall)
    monkeypatch.setattr(nf, "load_modules", lambda modules=("nfs.rate_limiter",): real(modules))
    assert nf.by_name("rate_limiter") is RateLimiter
    assert nf.by_id(4) is RateLimiter
    assert RateLimiter.type_id == 4 and RateLimiter.name == "rate_limiter"


def test_defaults():
    rl = limiter()
    assert (rl.pps, rl.burst, rl.bps, rl.byte_burst) == (1000, 100, None, None)
    assert RateLimiter().burst == 100  # usable before init
    st = rl.allocate_flow_state()
    assert send(rl, st, 7.0, 150) == 100


def test_burst_then_limit():
    rl = limiter(pps=10, burst=5)
    st = rl.allocate_flow_state()
    assert send(rl, st, 100.0, 8) == 5  # both directions share the bucket
    assert (st["passed"], st["dropped"]) == (5, 3)


def test_refill_over_time():
    rl = limiter(pps=10, burst=5)
    st = rl.allocate_flow_state()
    assert send(rl, st, 100.0, 5) == 5
    assert send(rl, st, 100.05, 1) == 0      # half a token
    assert send(rl, st, 100.1, 2) == 1       # one token
    assert send(rl, st, 100.35, 3) == 2      # 2.5 tokens
    assert send(rl, st, 200.0, 10) == 5      # capped at the burst
    assert (st["passed"], st["dropped"]) == (13, 8)


def test_steady_rate():
    rl = limiter(pps=100, burst=1)
    st = rl.allocate_flow_state()
    # 1000 packets over 1 s offered at 1 kpps: about 100 pass
    passed = sum(rl.process_packet(packet(50.0 + i / 1000), st) for i in range(1000))
    assert 99 <= passed <= 101


def test_clock_going_backwards_refills_nothing():
    rl = limiter(pps=10, burst=2)
    st = rl.allocate_flow_state()
    assert send(rl, st, 10.0, 3) == 2
    assert send(rl, st, 5.0, 1) == 0
    assert send(rl, st, 5.1, 1) == 1


def test_byte_bucket():
    rl = limiter(pps=1000, burst=100, bps=1000, byte_burst=2000)
    st = rl.allocate_flow_state()
    assert send(rl, st, 1.0, 30, size=100) == 20          # bytes run out first
    assert st["btokens"] == 0 and st["tokens"] == 80
    assert send(rl, st, 1.1, 2, size=100) == 1            # 100 bytes refilled
    assert send(rl, st, 3.0, 1, size=1500) == 1
    assert rl.summary(st)["byte_tokens"] == pytest.approx(400, abs=1)


def test_packet_bucket_still_limits_under_bps():
    rl = limiter(pps=10, burst=3, bps=1e9)
    st = rl.allocate_flow_state()
    assert send(rl, st, 1.0, 5) == 3


def test_default_byte_burst():
    assert limiter(pps=1000, burst=100, bps=1_000_000).byte_burst == 100_000
    assert limiter(pps=1000, burst=1, bps=1000).byte_burst == 1514  # at least one full frame


def test_frame_larger_than_byte_burst_never_passes():
    rl = limiter(bps=1000, byte_burst=1000)
    st = rl.allocate_flow_state()
    assert send(rl, st, 1.0, 1, size=1200) == 0
    assert send(rl, st, 100.0, 1, size=1200) == 0
    assert send(rl, st, 100.0, 1, size=900) == 1


def test_config_change_applies_on_the_next_packet():
    rl = limiter(pps=10, burst=50)
    st = rl.allocate_flow_state()
    assert send(rl, st, 1.0, 10) == 10                    # 40 tokens left
    rl.init({"pps": 10, "burst": 5})
    assert send(rl, st, 1.0, 10) == 5                     # cut down to the new burst
    rl.init({"pps": 10, "burst": 5, "bps": 500})          # byte bucket starts full (1514)
    assert send(rl, st, 2.0, 10, size=500) == 3


def test_round_trip_counts_elapsed_time_as_zero():
    rl = limiter(pps=10, burst=5)
    st = rl.allocate_flow_state()
    assert send(rl, st, 1000.0, 7) == 5
    data = rl.serialize(st)
    assert msgpack.unpackb(data)["last"] == 1000.0
    there = limiter(pps=10, burst=5)
    st2 = there.deserialize(data)
    assert st2["last"] is None and (st2["passed"], st2["dropped"]) == (5, 2)
    assert st2["tokens"] == pytest.approx(0)
    # another process's clock is far behind: no refill, no negative elapsed time
    assert send(there, st2, 3.0, 1) == 0
    assert send(there, st2, 3.1, 2) == 1                  # refills from there on
    assert there.summary(st2) == {"tokens": pytest.approx(0), "passed": 6, "dropped": 4}


def test_round_trip_with_bytes_and_of_a_fresh_state():
    rl = limiter(bps=1000, byte_burst=2000)
    st = rl.allocate_flow_state()
    send(rl, st, 1.0, 3)
    st2 = rl.deserialize(rl.serialize(st))
    assert st2["btokens"] == st["btokens"] == 1700
    fresh = rl.allocate_flow_state()
    assert rl.deserialize(rl.serialize(fresh)) == fresh
    with pytest.raises(ValueError):
        rl.deserialize(msgpack.packb("tokens"))


@pytest.mark.parametrize("config, message", [
    ({"pps": 0}, r"rate_limiter\.pps: 0 is not a finite number > 0"),
    ({"pps": -5}, r"rate_limiter\.pps: -5"),
    ({"pps": "fast"}, r"rate_limiter\.pps: 'fast'"),
    ({"pps": True}, r"rate_limiter\.pps: True"),
    ({"pps": None}, r"rate_limiter\.pps: None is not a finite number > 0$"),
    ({"pps": float("nan")}, r"rate_limiter\.pps: nan"),
    ({"burst": 0}, r"rate_limiter\.burst: 0 is not an integer >= 1"),
    ({"burst": 2.5}, r"rate_limiter\.burst: 2\.5"),
    ({"bps": 0}, r"rate_limiter\.bps: 0 is not a finite number > 0 or null"),
    ({"bps": float("inf")}, r"rate_limiter\.bps: inf"),
    ({"byte_burst": 3000}, r"rate_limiter\.byte_burst: only meaningful with bps"),
    ({"bps": 100, "byte_burst": 0}, r"rate_limiter\.byte_burst: 0 is not an integer >= 1 or null"),
    ({"rate": 5}, r"rate_limiter: unknown config keys \['rate'\]"),
    ([1, 2], r"rate_limiter: config must be an object"),
])
def test_bad_config_is_a_clear_error(config, message):
    rl = limiter(pps=10, burst=5)
    with pytest.raises(NFError, match=message):
        rl.init(config)
    assert (rl.pps, rl.burst, rl.config) == (10, 5, {"pps": 10, "burst": 5})  # unchanged


def test_summary_is_json():
    rl = limiter(pps=10, burst=5, bps=10_000)
    st = rl.allocate_flow_state()
    send(rl, st, 1.0, 7)
    s = rl.summary(st)
    assert json.loads(json.dumps(s)) == s
    assert (s["passed"], s["dropped"]) == (5, 2)
    assert json.dumps(rl.summary(rl.allocate_flow_state()))


def test_chain_with_both_nfs(monkeypatch):
    real = nf.load_modules
    monkeypatch.setattr(nf, "load_modules",
                        lambda modules=("nfs.firewall", "nfs.rate_limiter"): real(modules))
    chain = nf.encode_chain(["firewall", "rate_limiter"])
    assert chain == 0x42
    assert nf.chain_names(chain) == ["firewall", "rate_limiter"]
