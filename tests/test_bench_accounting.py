"""The benchmarks' bookkeeping without a testbed (no root): the frames they
offer, where every frame of a trial went, the NF checks that make a trial
valid, the zero-loss search and how the CLI flags a bad trial."""
from __future__ import annotations

import struct

import pytest

from nfactor_xdp.cli.bench import accounting_line
from nfactor_xdp.dataplane.packet import FLOW, classify
from nfactor_xdp.tools.bench import accounting
from nfactor_xdp.tools.bench.harness import Bench, Flows
from nfactor_xdp.tools.bench.load import HTTP_REQUEST, make_frame

SRC = {"mac": "02:00:00:00:00:01", "ipv4": "10.77.0.1/24"}
DST = {"mac": "02:00:00:00:00:02", "ipv4": "10.77.0.2/24"}


def _ip_checksum_ok(frame: bytes) -> bool:
    s = sum(struct.unpack("!10H", frame[14:34]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


@pytest.mark.parametrize("size", [42, 64, 128, 1514])
def test_udp_frames_say_their_size_in_every_header(size):
    f = make_frame(SRC, DST, tcp=False, dport=9, size=size)
    assert len(f) == size
    assert struct.unpack("!H", f[16:18])[0] == size - 14        # IP total length
    assert struct.unpack("!H", f[38:40])[0] == size - 34        # UDP length
    assert _ip_checksum_ok(f) and classify(f)[0] == FLOW


def test_tcp_frames_carry_one_http_request():
    f = make_frame(SRC, DST, tcp=True, dport=80, size=64)
    assert f.endswith(HTTP_REQUEST) and len(f) == 54 + len(HTTP_REQUEST)
    assert struct.unpack("!H", f[16:18])[0] == len(f) - 14
    assert struct.unpack("!I", f[38:42])[0] == 1                 # the first request's sequence number
    assert _ip_checksum_ok(f) and classify(f)[0] == FLOW


def test_flows_name_their_keys_as_the_runtime_does():
    fl = Flows(10000, 3, 80, True)
    f = make_frame(SRC, DST, tcp=True, dport=80)
    f = f[:34] + struct.pack("!H", 10001) + f[36:]
    assert classify(f)[1].hex() in fl.keys(SRC["ipv4"], DST["ipv4"])
    assert len(fl.keys(SRC["ipv4"], DST["ipv4"])) == 3


def _snap(sink=0, switch=None, rt_switch=None, runtimes=None, links=None):
    base = {"sw-rt0": {"tx_dropped": 0}, "rt0": {"tx_dropped": 0}, "ext1": {"tx_dropped": 0}, **(links or {})}
    return {"sink": sink, "sink_other": 0, "switch": switch or {}, "links": base,
            "rt_switch": rt_switch or {0: {"to_socket": 0, "no_socket": 0, "from_rt_packets": 0}},
            "runtimes": runtimes or {0: {"pid": 10, "frames": 0, "rx_pending": 0}}}


def test_every_frame_of_a_trial_is_accounted_for():
    a = _snap()
    b = _snap(sink=900, switch={"drop_no_runtime": 5, "redirect_err": 0},
              rt_switch={0: {"to_socket": 995, "no_socket": 0, "from_rt_packets": 900}},
              runtimes={0: {"pid": 10, "frames": 975, "forwarded": 900, "socket_full": 20,
                            "dropped_chain": 70, "tx_ring_full": 5, "rx_pending": 0}},
              links={"ext1": {"tx_dropped": 0}})
    acc = accounting.account([a, b], 1010, 10)
    assert acc["offered"] == 1000 and acc["forwarded"] == 900 and acc["generator_veth_dropped"] == 10
    assert acc["drops"] == {"switch_drop_no_runtime": 5, "runtime_socket_full": 20, "runtime_dropped_chain": 70,
                            "runtime_tx_ring_full": 5}
    assert acc["unaccounted"] == 0 and acc["per_runtime"][0]["not_explained"] == 0
    assert acc["to_actors"] == 975
    line = accounting_line({**acc, "valid": True, "invalid_because": []})
    assert line.startswith("offered 1000 (sent 1010, 10 not taken by its veth) = forwarded 900 + ")
    assert line.endswith("+ unaccounted 0")


def test_migration_markers_dropped_with_the_frames_are_not_the_generators():
    """The switch agent's markers reach a runtime's socket with the offered
    frames; those lost to a full ring are among its drops (and sent again),
    so they are taken out before anything is called unaccounted."""
    a = {**_snap(), "markers_sent": 100}
    b = {**_snap(sink=900, rt_switch={0: {"to_socket": 1030, "no_socket": 0, "from_rt_packets": 900}},
                 runtimes={0: {"pid": 10, "frames": 950, "forwarded": 900, "markers": 50, "socket_full": 130,
                               "rx_pending": 0}}), "markers_sent": 180}
    acc = accounting.account([a, b], 1000, 0)
    assert acc["markers"] == {"injected": 80, "consumed": 50, "among_drops": 30}
    assert acc["lost"] == 100 and acc["counted_drops"] == 130 and acc["unaccounted"] == 0
    assert "of which 30 migration markers" in accounting_line({**acc, "valid": True, "invalid_because": []})
    # without the switch agent's count, nothing is assumed
    acc = accounting.account([{**a, "markers_sent": None}, b], 1000, 0)
    assert acc["unaccounted"] == -30


def test_what_a_killed_runtime_took_with_it_is_unaccounted_and_located():
    a = _snap()
    # 100 frames wait in the runtime's ring when it is killed; 100 more find no socket while it is down
    before_kill = _snap(sink=400, rt_switch={0: {"to_socket": 500, "no_socket": 0, "from_rt_packets": 400}},
                        runtimes={0: {"pid": 10, "frames": 400, "forwarded": 400, "rx_pending": 100}})
    end = _snap(sink=800, rt_switch={0: {"to_socket": 900, "no_socket": 100, "from_rt_packets": 800}},
                runtimes={0: {"pid": 11, "frames": 400, "forwarded": 400, "rx_pending": 0}})
    acc = accounting.account([a, before_kill, end], 1000, 0)
    assert acc["runtimes"][0]["replaced"] == 1 and acc["runtimes"][0]["frames"] == 800
    assert acc["drops"] == {"runtime_no_socket": 100}
    assert acc["unaccounted"] == 100 == acc["per_runtime"][0]["not_explained"]


def _actor(packets, **nfs):
    return {"key": f"k{packets}-{len(nfs)}-{id(nfs)}", "packets": {"orig": packets, "reply": 0}, "dropped": 0,
            "nfs": nfs}


def test_a_parser_out_of_sync_makes_the_trial_invalid(monkeypatch):
    hp = {"n_requests": 10, "n_errors": 0, "in_sync": {"orig": True, "reply": True}}
    bad = {"n_requests": 3, "n_errors": 1, "in_sync": {"orig": False, "reply": True}}
    fm = {"packets": {"orig": 10, "reply": 0}}
    actors = [_actor(10, flow_monitor=fm, http_parser=hp), _actor(10, flow_monitor=fm, http_parser=bad)]
    monkeypatch.setattr(accounting, "_flows_of", lambda *a, **k: actors)
    acc = {"to_actors": 20, "drops": {}}
    out = accounting.nf_checks("n", [0], set(), ["flow_monitor", "http_parser"], acc)
    assert not out["ok"] and out["http_desync_flows"] == 1
    assert any("parsed 13 requests of 20" in p for p in out["problems"])
    out = accounting.nf_checks("n", [0], set(), ["flow_monitor"], dict(acc, to_actors=25))
    assert out["problems"] == ["actors counted 20 frames, the runtimes' counters 25 and the switch 0"]


def test_frames_the_switch_handled_for_offloaded_flows_count_for_their_actors(monkeypatch):
    fm = {"packets": {"orig": 10, "reply": 0}}
    actors = [_actor(10, flow_monitor=fm), _actor(10, flow_monitor=fm)]
    monkeypatch.setattr(accounting, "_flows_of", lambda *a, **k: actors)
    acc = {"to_actors": 4, "in_switch": 16, "drops": {}}
    assert accounting.nf_checks("n", [0], set(), ["flow_monitor"], acc)["ok"]
    out = accounting.nf_checks("n", [0], set(), ["flow_monitor"], dict(acc, in_switch=15))
    assert out["problems"] == ["actors counted 20 frames, the runtimes' counters 4 and the switch 15"]


class _Search(Bench):
    """A Bench whose trials are a node that carries `capacity` frames/s (and
    fails the confirmations listed in `flaky`)."""

    def __init__(self, capacity: float, flaky: int = 0, disturbed: int = 0):
        self.capacity, self.flaky, self.disturbed, self.asked = capacity, flaky, disturbed, []

    def trial(self, rate, seconds, tcp, role="trial"):
        self.asked.append(rate)
        offered = rate or 5 * self.capacity
        ok = offered <= self.capacity
        other_load = {}
        if ok and len(self.asked) > 8 and self.flaky:
            self.flaky, ok = self.flaky - 1, False
        if ok and len(self.asked) > 1 and self.disturbed:  # other load takes the runtime's CPU
            self.disturbed, ok, other_load = self.disturbed - 1, False, {1: 0.3}
        fwd = offered if ok else self.capacity
        return {"offered": offered, "forwarded": fwd, "lost": offered - fwd, "seconds": 1.0, "valid": ok,
                "zero_loss": ok, "offered_mpps": offered / 1e6, "forwarded_mpps": fwd / 1e6,
                "disturbed": other_load}


def test_the_zero_loss_rate_is_confirmed_by_a_second_trial():
    m = _Search(1000).zero_loss(tcp=True, steps=7)
    assert m["confirmed"] and 0.0009 < m["zero_loss_mpps"] <= 0.001
    assert m["trial_count"] == 9 and len(m["confirming_trials"]) == 2
    assert not m["generator_limited"]


def test_a_failed_confirmation_steps_down_and_needs_two_passes():
    b = _Search(1000, flaky=1)
    m = b.zero_loss(tcp=True, steps=7)
    assert m["confirmed"] and m["trial_count"] == 11
    assert b.asked[-2] == b.asked[-1] == pytest.approx(b.asked[-3] * 0.9)


def test_a_trial_that_lost_frames_to_other_load_is_run_again():
    b = _Search(1000, disturbed=2)
    m = b.zero_loss(tcp=True, steps=7)
    assert m["rerun_trials"] == 2 and m["disturbed_trials"] == 2 and m["trial_count"] == 11
    assert b.asked[1] == b.asked[2] == b.asked[3]  # the first search step, twice more
    assert m["confirmed"] and 0.0009 < m["zero_loss_mpps"] <= 0.001


def test_a_worker_hosts_links_and_switch_drops_are_counted():
    """Runtimes on a worker host: frames lost on the fabric (either end's
    fab0, the bridge's ports), in the worker's runtime port, or dropped by
    the worker's switch are counted drops, not unaccounted."""
    zero = {"tx_dropped": 0, "rx_dropped": 0}
    names = ("fab0", "h1:fab0", "fab:p1", "h1:sw-rt8")
    a = _snap(links=dict.fromkeys(names, zero), switch={"h1": {"drop_fabric_runtime": 1}})
    b = _snap(sink=90, links={"fab0": {"tx_dropped": 3, "rx_dropped": 0}, "h1:fab0": {"tx_dropped": 0, "rx_dropped": 2},
                              "fab:p1": {"tx_dropped": 1, "rx_dropped": 0}, "h1:sw-rt8": {"tx_dropped": 2, "rx_dropped": 0}},
              switch={"h1": {"drop_fabric_runtime": 3}})
    acc = accounting.account([a, b], 100, 0)
    assert acc["drops"] == {"fabric_dropped": 6, "runtime_port_full": 2, "h1_switch_drop_fabric_runtime": 2}
    assert acc["unaccounted"] == 0
