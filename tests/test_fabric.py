"""The hosts of a node, pure logic: the fabric addresses and where each
process listens, the encapsulation as Python builds it, the configuration's
checks, and the controller's watch over worker hosts (fence, then exited;
lifted once none of the fenced processes runs)."""
from __future__ import annotations

import socket
import struct

import pytest

from nfactor_xdp.control.host_watch import HostWatch
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats import fabric
from nfactor_xdp.formats.config import ConfigError, NodeConfig, control_address
from nfactor_xdp.formats.messages import MsgType
from nfactor_xdp.kern import layouts as L

HOSTS = "10.78.0.1,10.78.0.2,10.78.0.3"


@pytest.mark.parametrize("text, why", [("10.78.0.1,10.78.0.1", "twice"), ("10.78.0.1,fe80::1", "IPv4"),
                                       ("10.78.0.1,224.0.0.1", "unicast"), ("x", "IPv4"),
                                       (",".join(f"10.0.0.{i}" for i in range(1, 10)), "at most")])
def test_bad_host_lists_are_refused(text, why):
    with pytest.raises(fabric.FabricError, match=why):
        fabric.parse_hosts(text)


def test_every_process_has_its_address_on_its_host(monkeypatch, tmp_path):
    monkeypatch.setattr(nodeconf, "RUN_ROOT", str(tmp_path))  # a one-host node's sockets: a directory made
    cfg = NodeConfig(name="n", hosts=HOSTS, control_port=7000, runtimes=1).validate()
    assert control_address(cfg, "controller") == ("10.78.0.1", 7000)
    assert control_address(cfg, "heartbeat") == ("10.78.0.1", 7001)
    assert control_address(cfg, "switch") == ("10.78.0.1", 7002)
    assert control_address(cfg, "supervisor", host=2) == ("10.78.0.3", 7003)
    assert control_address(cfg, "rt9") == ("10.78.0.2", 7000 + 16 + 9)  # runtime 9: host 1's second
    assert control_address(cfg, "cli-1-ab") == ("10.78.0.1", 0)
    worker = NodeConfig(name="n-h2", hosts=HOSTS, host_id=2, runtimes=2).validate()
    assert worker.runtime_ids == [16, 17] and control_address(worker, "supervisor") == ("10.78.0.3", 7473)
    assert NodeConfig(name="n").validate().runtime_ids == [0, 1]
    assert isinstance(control_address(NodeConfig(name="n"), "controller"), str)  # one host: UNIX sockets


@pytest.mark.parametrize("settings, why", [
    ({"hosts": "10.78.0.1"}, "at least one worker"),
    ({"hosts": HOSTS, "host_id": 3}, "not one of the 3"),
    ({"host_id": 1}, "needs --hosts"),
    ({"hosts": HOSTS, "runtimes": 9}, "at most 8"),
    ({"hosts": HOSTS, "control_port": 65500}, "control_port"),
    ({"hosts": HOSTS, "host_id": 1, "runtimes": 0}, "runtimes must be 1"),
])
def test_bad_host_settings_are_refused(settings, why):
    with pytest.raises(ConfigError, match=why):
        NodeConfig(name="n", **settings).validate()


def test_an_ingress_host_may_leave_every_runtime_to_its_workers():
    assert NodeConfig(name="n", hosts=HOSTS, runtimes=0).validate().runtime_ids == []


def test_the_encapsulation_is_what_the_switch_expects():
    tagged = bytes([L.C["NFX_INGRESS_TAG"] | 1]) + bytes(60)
    frame = fabric.encap(("10.78.0.2", "02:78:00:00:00:02"), ("10.78.0.1", "02:78:00:00:00:01"), 9, tagged)
    assert len(frame) == fabric.ENCAP_LEN - 1 + len(tagged)
    assert frame[:12] == bytes.fromhex("027800000001" "027800000002") and frame[12:14] == b"\x08\x00"
    ver, _, total, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", frame[14:34])
    assert (ver, total, frag, proto) == (0x45, len(frame) - 14, 0x4000, socket.IPPROTO_UDP)
    words = struct.unpack("!10H", frame[14:34])
    s = sum(words)
    assert (s & 0xFFFF) + (s >> 16) == 0xFFFF  # the IPv4 checksum holds
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == ("10.78.0.2", "10.78.0.1")
    sport, dport, ulen, csum = struct.unpack("!HHHH", frame[34:42])
    assert (sport, dport, ulen, csum) == (L.C["NFX_FABRIC_SRC_PORT"] + 9, fabric.UDP_PORT, len(frame) - 34, 0)
    assert frame[42:45] == bytes([L.C["NFX_FABRIC_MAGIC"], L.C["NFX_FABRIC_VERSION"], 9])
    assert frame[45:] == tagged  # the tag is the header's last byte


class FakeController:
    def __init__(self, view):
        self.view, self.started, self.pushed, self.ops, self.sent = view, 0.0, 0, [], []
        self.maps = self
        self.fences: dict[int, bool] = {}
        self.ep = self

    def fence_host(self, host, fenced=True, then=None):
        self.fences[host] = fenced
        if then is not None:
            then()

    def host_table(self):
        return {h: {"fenced": f} for h, f in self.fences.items()}

    def _change(self, op):
        self.ops.append(op)
        self.view[op["id"]].update(state=op["state"], exited=op.get("exited"))

    def push_view(self):
        self.pushed += 1

    def send(self, addr, msg_type, body):
        self.sent.append((addr, msg_type, body))


def view(**states):
    return {rt: {"id": rt, "state": st, "pid": 100 + rt} for rt, st in
            ((int(k[2:]), v) for k, v in states.items())}


def test_a_silent_host_whose_runtimes_all_failed_is_fenced_then_its_runtimes_exited():
    ctl = FakeController(view(rt0="running", rt8="failed", rt9="failed", rt16="running"))
    watch = HostWatch(ctl, 3, timeout=0.6)
    watch.alive = {1: 10.0, 2: 10.0}
    watch.detect(10.5)
    assert not ctl.fences and not ctl.ops  # not silent long enough
    watch.detect(10.7)
    assert ctl.fences == {1: True}
    assert [(op["id"], op["exited"]) for op in ctl.ops] == [(8, True), (9, True)] and ctl.pushed == 1
    assert watch.is_fenced(9) and not watch.is_fenced(16)
    watch.detect(20.0)
    assert len(ctl.ops) == 2 and watch.stats["hosts_fenced"] == 1  # once


def test_a_host_with_a_running_runtime_or_a_live_supervisor_is_not_fenced():
    ctl = FakeController(view(rt8="failed", rt9="running"))
    watch = HostWatch(ctl, 2, timeout=0.6)
    watch.alive = {1: 0.0}
    watch.detect(5.0)
    assert not ctl.fences  # a runtime still heartbeats: the host lives
    ctl = FakeController(view(rt8="failed"))
    watch = HostWatch(ctl, 2, timeout=0.6)
    watch.on_alive({"host": 1, "runtimes": {}}, "sup")
    watch.detect(watch.alive[1] + 0.1)
    assert not ctl.fences  # its supervisor speaks: it reports exits itself


def test_a_fenced_host_is_lifted_only_once_none_of_its_fenced_processes_runs():
    ctl = FakeController(view(rt8="failed"))
    watch = HostWatch(ctl, 2, timeout=0.6)
    watch.alive = {1: 0.0}
    watch.detect(1.0)
    assert ctl.fences == {1: True}
    watch.on_alive({"host": 1, "runtimes": {"8": 108}}, "sup")  # cut off, not dead: rt8 still runs
    assert ctl.sent == [("sup", MsgType.HOST_FENCED, {"kill": [{"id": 8, "pid": 108}]})] and ctl.fences[1]
    watch.on_alive({"host": 1, "runtimes": {"8": 555}}, "sup")  # restarted
    assert ctl.fences[1] is False and not watch.is_fenced(8)
    for bad in ({"host": 0}, {"host": 7}, {"host": "1"}, {}):
        watch.on_alive(bad, "x")  # ignored
    assert watch.stats["hosts_unfenced"] == 1


def test_a_restarted_controller_keeps_the_fences_the_switch_has():
    ctl = FakeController(view(rt8="failed"))
    ctl.fences = {1: True}
    watch = HostWatch(ctl, 2, timeout=0.6)
    watch.recover()
    assert watch.is_fenced(8) and watch.fenced[1] == {8: 108}
