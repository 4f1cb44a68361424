"""The runtime's per-packet logic without sockets (no root): actors per
flow with the chain their rule names, the fast path agreeing with the slow
one, expiry on idle and on TCP close, policy changes, third-party NFs."""
import sys
import textwrap

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.formats.messages import Message, MsgType
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.dataplane.lifetime import CLOSE_LINGER
from nfactor_xdp.dataplane.runtime import Runtime


def udp(sport=5000, dport=53, src="10.0.0.1", dst="10.0.0.2"):
    return memoryview(bytearray(bytes(Ether() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / b"x")))


def tcp(flags="A", sport=40000, dport=80, src="10.0.0.1", dst="10.0.0.2"):
    return memoryview(bytearray(bytes(Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))))


def runtime(policy: dict | None = None, idle=30.0):
    return Runtime(NodeConfig(name="t", idle_timeout=idle), 0, policy=Policy.from_dict(policy or {}))


def test_one_actor_per_flow_both_directions_fast_and_slow_path():
    rt = runtime({"default_chain": ["flow_monitor"]})
    for _ in range(5):
        assert rt.handle(udp())
    assert rt.handle(udp(sport=53, dport=5000, src="10.0.0.2", dst="10.0.0.1"))
    assert len(rt.flows) == 1
    (actor,) = rt.flows.values()
    assert actor.packets == [5, 1]
    assert actor.states[0]["packets"] == [5, 1]
    assert len(rt.fast) == 2  # one fast-path entry per direction
    v6 = memoryview(bytearray(bytes(Ether() / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2))))
    rt.handle(v6)
    rt.handle(v6)
    assert len(rt.flows) == 2 and len(rt.fast) == 2  # IPv6 takes the full parser, same actor


def test_rules_pick_the_chain_of_each_new_flow():
    rt = runtime({"rules": [{"proto": "tcp", "dport": "80", "chain": ["flow_monitor", "firewall", "http_parser"]}],
                  "default_chain": ["flow_monitor"]})
    rt.handle(tcp(flags="S"))
    rt.handle(udp())
    chains = sorted(tuple(nf.name for nf in a.nfs) for a in rt.flows.values())
    assert chains == [("flow_monitor",), ("flow_monitor", "firewall", "http_parser")]
    # one NF instance per runtime, shared by every actor
    assert len(rt.nf_instances) == 3


def test_firewall_drop_via_policy_and_live_policy_change():
    rt = runtime({"default_chain": ["firewall"]})
    assert rt.handle(udp(dport=9001))
    rt.set_policy(Policy.from_dict({"default_chain": ["firewall"], "nf_config": {"firewall": {
        "rules": [{"proto": "udp", "dport": "9001", "action": "drop"}]}}}))
    assert not rt.handle(udp(dport=9001))  # the existing flow re-checked against the new config
    assert rt.handle(udp(dport=9002))


def test_idle_flows_expire_and_closed_ones_go_sooner():
    rt = runtime(idle=10.0)
    rt.now = 100.0
    rt.handle(udp())
    rt.handle(tcp(flags="S"))
    rt.handle(tcp(flags="FA"))
    rt.handle(tcp(flags="FA", sport=80, dport=40000, src="10.0.0.2", dst="10.0.0.1"))
    assert len(rt.flows) == 2
    rt.now = 100.0 + CLOSE_LINGER + 0.1
    rt.expire_idle()
    assert len(rt.flows) == 1  # the closed TCP flow is gone, its fast-path entries too
    assert all(a.proto == 17 for a, _ in rt.fast.values())
    rt.now = 111.0
    rt.expire_idle()
    assert not rt.flows and not rt.fast
    assert rt.stats["flows_expired"] == 2


def test_non_flow_frames_are_counted_and_dropped():
    rt = runtime()
    arp = memoryview(bytearray(bytes(Ether(type=0x0806) / (b"\0" * 28))))
    assert not rt.handle(arp)
    assert rt.stats["dropped_not_flow"] == 1


def test_third_party_nf_module_from_the_policy(tmp_path, monkeypatch):
    (tmp_path / "my_counter_nf.py").write_text(textwrap.dedent('''
        from nfactor_xdp.dataplane.nf import NetworkFunction, register

        @register
        class EveryOther(NetworkFunction):
            name, type_id = "every_other", 12
            def allocate_flow_state(self):
                return {"n": 0}
            def process_packet(self, pkt, state):
                state["n"] += 1
                return state["n"] % 2 == 1
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    # the NF registry is process-wide: register into copies that go with the test
    from nfactor_xdp.dataplane import nf
    monkeypatch.setattr(nf, "_BY_NAME", dict(nf._BY_NAME))
    monkeypatch.setattr(nf, "_BY_ID", dict(nf._BY_ID))
    rt = runtime({"nf_modules": ["my_counter_nf"], "default_chain": ["every_other"]})
    verdicts = [rt.handle(udp()) for _ in range(4)]
    assert verdicts == [True, False, True, False]
    sys.modules.pop("my_counter_nf", None)


class _Peers:
    """A stand-in for the runtime's control endpoint: every request is
    answered at once, as a target and a switch agent that agree would."""

    def __init__(self):
        self.sent = []

    def request(self, addr, msg_type, body, on_reply, **kw):
        self.sent.append(msg_type)
        on_reply(Message(msg_type, len(self.sent), "peer", {"ok": True}, 0))
        return len(self.sent)

    def send(self, addr, msg_type, body, rid=None):
        self.sent.append(msg_type)
        return len(self.sent)

    def reply(self, msg, addr, body):
        self.sent.append(MsgType.REPLY)
        return msg.rid


def test_a_frame_of_a_flow_that_migrated_away_is_counted_not_made_a_new_actor():
    from nfactor_xdp.formats import marker
    rt = runtime({"default_chain": ["flow_monitor"]})
    rt.view.update({"version": 1, "runtimes": [{"id": 0, "state": "running", "addr": ["127.0.0.1", 1]},
                                                {"id": 1, "state": "running", "addr": ["127.0.0.1", 2]}]})
    peers = _Peers()
    rt.migrator.attach(peers, ("127.0.0.1", 3))
    for _ in range(3):
        assert rt.handle(udp())
    (actor,) = rt.flows.values()
    rt.migrator.start_batch(1, [actor.key])  # create and move answered: waiting for the marker
    assert peers.sent == [MsgType.MIGRATE_CREATE, MsgType.MIGRATE_MOVE]
    assert rt.handle(udp())  # a frame ahead of the marker: still processed here
    assert not rt.handle(memoryview(bytearray(marker.frame(actor.key, actor.orig_dir, actor.migration.payload))))
    # the marker sent the state, the target took it: the flow is gone from here
    assert peers.sent[-1] == MsgType.MIGRATE_STATE and not rt.flows
    assert rt.migrator.stats["out_succeeded"] == 1 and rt.migrator.stats["after_marker"] == 0
    created = rt.stats["flows_created"]
    # a frame of the flow behind its marker: counted and dropped, no new actor with fresh state
    assert not rt.handle(udp())
    assert not rt.handle(udp(sport=53, dport=5000, src="10.0.0.2", dst="10.0.0.1"))  # either direction
    assert rt.migrator.stats["after_marker"] == 2
    assert not rt.flows and rt.stats["flows_created"] == created
    # another flow is not affected
    assert rt.handle(udp(sport=5001)) and len(rt.flows) == 1
    # the flow coming back (a migration to this runtime) is a flow here again
    rt.migrator.on_create(_create_msg(actor), ("127.0.0.1", 2))
    assert rt.flows.get(actor.key) is not None
    assert not rt.handle(udp())  # held for the state, as an arriving flow's frames are
    assert len(rt.flows.get(actor.key).migration.buffer) == 1 and rt.migrator.stats["after_marker"] == 2


def _create_msg(actor):
    body = {"key": actor.key.hex(), "chain": actor.chain, "rule": actor.rule_id, "orig_dir": actor.orig_dir}
    return Message(MsgType.MIGRATE_CREATE, 1, "rt1", body, 0)
