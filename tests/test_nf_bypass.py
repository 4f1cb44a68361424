"""Traffic that used to bypass the NFs, end to end through a node: IP
fragments (matched port rules as port 0), VLAN-tagged frames (forwarded
untouched as "other" traffic) and IP protocols other than TCP/UDP (the same).
A firewall policy must hold for all of them as for plain TCP; what it allows
must still arrive, fragments reassembled by the sink host's own stack."""
from __future__ import annotations

import json
import subprocess

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from nfactor_xdp.tools.traffic import HDR, MAGIC
from tests.helpers import PY, Proc

pytestmark = [pytest.mark.root, pytest.mark.netns]

NO_SSH = {"default_chain": ["firewall"],
          "nf_config": {"firewall": {"rules": [{"proto": "tcp", "dport": "22", "action": "drop"}]}}}
SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7), ("NOP", None)]  # a 32-byte header: 4 fragments


class Hosts:
    """Raw frames from the source host, and what the sink host's interface saw."""

    def __init__(self, node):
        h = node.show["hosts"]
        self.node = node
        self.src, self.dst = h["src"], h["dst"]

    def eth(self, *vids: int, ad: bool = False) -> Ether:
        out = Ether(src=self.src["mac"], dst=self.dst["mac"])
        for i, vid in enumerate(vids):
            out = out / (Dot1AD(vlan=vid) if ad and i == 0 else Dot1Q(vlan=vid))
        return out

    def exchange(self, frames: list[bytes], sniff: float = 2.0) -> list[Ether]:
        """Send `frames` from the source; the frames the sink received from it."""
        sniffer = Proc(self.node.dst_ns, "frames-sniff", "--ifname", self.dst["ifname"], "--src-mac",
                       self.src["mac"], "--duration", str(sniff)).wait_ready()
        try:
            subprocess.run(["ip", "netns", "exec", self.node.src_ns, PY, "-m", "nfactor_xdp.tools.traffic",
                            "frames-send", "--ifname", self.src["ifname"]],
                           input=json.dumps([f.hex() for f in frames]), text=True, check=True, timeout=30,
                           capture_output=True)
            got = sniffer.result()
        finally:
            sniffer.kill()
        return [Ether(bytes.fromhex(h)) for h in got["frames"]]


def _datagram(seq: int, size: int = 3000) -> bytes:
    """A udp-sink payload (magic, flow, sequence) padded to `size` bytes."""
    return HDR.pack(MAGIC, 7, seq) + b"p" * (size - HDR.size)


def test_a_fragmented_syn_to_a_dropped_port_never_reaches_the_sink(node_factory):
    """The issue's case: `tcp dport 22 drop`; a SYN to port 22 sent as four
    IPv4 fragments, or as IPv6 fragments, must not arrive; a fragmented UDP
    datagram to an allowed port arrives whole (the sink's stack reassembles)."""
    node = node_factory(2, NO_SSH)
    hosts = Hosts(node)
    eth = hosts.eth()
    syn4 = IP(src=node.src_ip, dst=node.dst_ip, id=4242) / TCP(sport=40022, dport=22, flags="S", seq=4242,
                                                                options=SYN_OPTIONS)
    syn6 = IPv6(src=node.src_ip6, dst=node.dst_ip6) / IPv6ExtHdrFragment(id=6262) / \
        TCP(sport=40022, dport=22, flags="S", seq=6262, options=SYN_OPTIONS)
    udp4 = IP(src=node.src_ip, dst=node.dst_ip, id=5151) / UDP(sport=40053, dport=9000) / _datagram(1)
    udp6 = IPv6(src=node.src_ip6, dst=node.dst_ip6) / IPv6ExtHdrFragment(id=5252) / \
        UDP(sport=40053, dport=9000) / _datagram(2)
    frags = {"syn4": fragment(syn4, fragsize=8), "syn6": fragment6(syn6, 64),
             "udp4": fragment(udp4, fragsize=1400), "udp6": fragment6(udp6, 1280)}
    assert len(frags["syn4"]) == 4 and len(frags["syn6"]) == 2 and len(frags["udp4"]) == 3
    sink = Proc(node.dst_ns, "udp-sink", "--bind", "::", "--expect", "2", "--timeout", "10").wait_ready()
    try:
        seen = hosts.exchange([bytes(eth / f) for name in ("syn4", "syn6", "udp4", "udp6") for f in frags[name]])
        got = sink.result()
    finally:
        sink.kill()
    ids4 = [p[IP].id for p in seen if IP in p]
    ids6 = [p[IPv6ExtHdrFragment].id for p in seen if IPv6ExtHdrFragment in p]
    assert 4242 not in ids4 and 6262 not in ids6, "a fragment of the SYN to port 22 reached the sink"
    assert ids4.count(5151) == 3 and ids6.count(5252) == len(frags["udp6"])  # every allowed fragment
    assert got["received"] == 2 and got["bad"] == 0  # two whole datagrams, reassembled by the sink
    assert sorted(s for seqs in got["flows"].values() for s in seqs) == [1, 2]
    frag = [r["fragments"] for r in node.status()["runtimes"]]
    assert sum(f["chain_dropped_datagrams"] for f in frag) == 2 and sum(f["reassembled"] for f in frag) == 4
    assert sum(f["frames_held"] for f in frag) == 0


def test_a_tagged_syn_to_a_dropped_port_is_dropped_and_tagged_traffic_to_others_passes(node_factory):
    """A VID-0 tag (Linux hosts take it as untagged), a VID-100 tag and two
    tags (802.1ad + 802.1Q): SYNs to port 22 are dropped, SYNs to port 80
    arrive with their tags.  Deeper stacks are dropped whatever they carry:
    Linux hosts take three VID-0 tags, or VID-0 802.1Q over 802.1ad, as
    untagged."""
    node = node_factory(2, NO_SSH)
    hosts = Hosts(node)
    tags = {0: ((0,), False), 1: ((100,), False), 2: ((100, 200), True)}
    frames = []
    for i, (vids, ad) in tags.items():
        for dport in (22, 80):
            frames.append(bytes(hosts.eth(*vids, ad=ad) / IP(src=node.src_ip, dst=node.dst_ip)
                                / TCP(sport=41000 + i, dport=dport, flags="S", seq=1000 * i + dport)))
    deep = [hosts.eth(0, 0, 0), hosts.eth(0) / Dot1AD(vlan=0)]
    frames += [bytes(e / IP(src=node.src_ip, dst=node.dst_ip) / TCP(sport=42000, dport=dport, flags="S", seq=9000))
               for e in deep for dport in (22, 80)]
    seen = hosts.exchange(frames)
    syns = {p[TCP].seq: p for p in seen if TCP in p and p[TCP].flags == "S"}
    assert sorted(syns) == [80, 1080, 2080], "a tagged SYN to port 22 reached the sink, or one to 80 did not"
    assert syns[1080][Dot1Q].vlan == 100
    assert syns[2080][Dot1AD].vlan == 100 and syns[2080][Dot1Q].vlan == 200
    flows = {f["flow"] for f in node.flows()["flows"]}
    assert {"tcp 10.77.0.1:41000 <-> 10.77.0.2:22", "tcp 10.77.0.1:41001 <-> 10.77.0.2:22 vlan 100",
            "tcp 10.77.0.1:41002 <-> 10.77.0.2:22 vlan 100.200"} <= flows
    sw = node.status()["switch"]
    assert sw["cls_vlan"] >= 10 and sw["drop_vlan_deep"] == 4


def test_a_gre_flow_is_dropped_by_a_proto_rule_while_esp_passes(node_factory):
    node = node_factory(2, {"default_chain": ["firewall"],
                            "nf_config": {"firewall": {"rules": [{"proto": "gre", "action": "drop"}]}}})
    hosts = Hosts(node)
    eth = hosts.eth()
    gre = [bytes(eth / IP(src=node.src_ip, dst=node.dst_ip, proto=47, id=4700 + i) / (b"\0\0\x08\0" + b"g" * 40))
           for i in range(3)]
    esp = [bytes(eth / IP(src=node.src_ip, dst=node.dst_ip, proto=50, id=5000 + i) / (b"e" * 40)) for i in range(3)]
    seen = hosts.exchange(gre + esp)
    protos = sorted(p[IP].proto for p in seen if IP in p and p[IP].proto in (47, 50))
    assert protos == [50, 50, 50]
    flows = {f["flow"]: f for f in node.flows()["flows"]}
    assert set(flows) >= {"gre 10.77.0.1 <-> 10.77.0.2", "esp 10.77.0.1 <-> 10.77.0.2"}
    assert node.status()["switch"]["cls_other_proto"] >= 6
