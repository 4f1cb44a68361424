"""Tests of nfactor_xdp.tools.testbed: pure logic without root, the real thing with."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from nfactor_xdp.kern import netns
from nfactor_xdp.tools import testbed as tbmod
from nfactor_xdp.tools.testbed import (
    Testbed,
    TestbedConfig,
    TestbedError,
    TestbedExists,
    list_testbeds,
)
from tests.helpers import making_testbeds, remove_namespaces

# Unique, short testbed names: "t<pid>_<n>" (at most 10 characters).
_PREFIX = f"t{os.getpid() % 10000}_"
_counter = itertools.count()


def unique_name() -> str:
    return f"{_PREFIX}{next(_counter)}"


# ==========================================================================
# pure logic (no root)


def test_config_defaults():
    cfg = TestbedConfig()
    assert cfg.name == "nfx"
    assert cfg.namespaces == {"src": "nfx-src", "dst": "nfx-dst", "node": "nfx-node"}
    assert (cfg.host_ifname, cfg.port0_ifname, cfg.port1_ifname) == ("eth0", "ext0", "ext1")
    assert (cfg.src_mac, cfg.dst_mac) == ("02:77:00:00:00:01", "02:77:00:00:00:02")
    assert (cfg.port0_mac, cfg.port1_mac) == ("02:77:00:00:01:00", "02:77:00:00:01:01")
    assert (cfg.src_ipv4, cfg.dst_ipv4, cfg.ipv4_prefixlen) == ("10.77.0.1", "10.77.0.2", 24)
    assert (cfg.src_ipv6, cfg.dst_ipv6, cfg.ipv6_prefixlen) == ("fd77::1", "fd77::2", 64)
    src = cfg.host("src")
    assert src["netns"] == "nfx-src" and src["port"] == "ext0"
    assert (src["peer_ipv4"], src["peer_ipv6"], src["peer_mac"]) == ("10.77.0.2", "fd77::2", cfg.dst_mac)
    dst = cfg.host("dst")
    assert dst["port"] == "ext1" and dst["peer_mac"] == cfg.src_mac
    with pytest.raises(ValueError):
        cfg.host("node")
    with pytest.raises(ValueError):
        cfg.netns_name("sink")


def test_name_derivation():
    assert Testbed().name == "nfx"
    tb = Testbed(name="lab1")
    assert tb.config == TestbedConfig(name="lab1")
    assert tb.namespaces == {"src": "lab1-src", "dst": "lab1-dst", "node": "lab1-node"}
    assert tb.state_path == os.path.join(tbmod.STATE_DIR, "testbed-lab1.json")
    # a name next to a config: the config's plan under that name
    cfg = TestbedConfig(name="a", src_ipv4="10.9.0.5", dst_ipv4="10.9.0.6")
    tb = Testbed(cfg, name="b")
    assert tb.name == "b" and tb.config.src_ipv4 == "10.9.0.5"
    assert Testbed(cfg).config is cfg
    # the longest name keeps NAME-node within an interface name's 15 characters
    longest = "n" * tbmod.MAX_NAME_LEN
    assert len(TestbedConfig(name=longest).netns_name("node")) == 15


@pytest.mark.parametrize(
    "name",
    ["", "n" * (tbmod.MAX_NAME_LEN + 1), "a/b", "-a", "_a", "a b", "a.b", "a:b", "..", "é", "ab\n", None, 7],
)
def test_bad_names_rejected(name):
    with pytest.raises(ValueError, match="testbed name"):
        TestbedConfig(name=name)
    if name is not None:  # Testbed(name=None) means the default name
        with pytest.raises(ValueError):
            Testbed(name=name)


@pytest.mark.parametrize("name", ["nfx", "a", "A-1_b", "9lives", "n" * tbmod.MAX_NAME_LEN])
def test_good_names_accepted(name):
    assert TestbedConfig(name=name).name == name


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("host_ifname", "e" * 16, "longer than 15"),
        ("host_ifname", "", "non-empty"),
        ("host_ifname", "eth 0", "invalid"),
        ("port0_ifname", "a/b", "invalid"),
        ("port1_ifname", ".", "invalid"),
        ("port1_ifname", "ext0", "different names"),
        ("src_mac", "02:77:00:00:00", "not a MAC"),
        ("src_mac", "zz:77:00:00:00:01", "not a MAC"),
        ("src_mac", "02:77:00:00:00:01\n", "not a MAC"),
        ("src_mac", "03:77:00:00:00:01", "multicast"),
        ("dst_mac", "02:77:00:00:00:01", "same as src_mac"),
        ("port0_mac", "00:00:00:00:00:00", "all zeros"),
        ("src_ipv4", "10.77.0.2", "same"),
        ("src_ipv4", "10.78.0.1", "not in one /24"),
        ("src_ipv4", "fd77::1", "not an IPv4"),
        ("src_ipv4", "10.77.0.0", "network or broadcast"),
        ("dst_ipv4", "10.77.0.255", "network or broadcast"),
        ("dst_ipv4", "224.0.0.1", "not a usable unicast"),
        ("src_ipv4", "nonsense", "not an IP address"),
        ("src_ipv4", 167575553, "must be a string"),
        ("ipv4_prefixlen", 0, "prefix length"),
        ("ipv4_prefixlen", 33, "prefix length"),
        ("ipv4_prefixlen", "24", "prefix length"),
        ("ipv6_prefixlen", True, "prefix length"),
        ("dst_ipv6", "fd78::2", "not in one /64"),
        ("dst_ipv6", "10.77.0.2", "not an IPv6"),
        ("src_ipv6", "fe80::1", "not a usable unicast"),
        ("src_ipv6", "::", "not a usable unicast"),
    ],
)
def test_bad_config_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        TestbedConfig(**{field: value})


def test_config_normalised():
    cfg = TestbedConfig(src_mac="02:AA:BB:CC:DD:EE", src_ipv6="fd77:0:0::0:1", dst_ipv6="FD77::2")
    assert cfg.src_mac == "02:aa:bb:cc:dd:ee"
    assert (cfg.src_ipv6, cfg.dst_ipv6) == ("fd77::1", "fd77::2")
    # a /31 has no network or broadcast address to refuse
    assert TestbedConfig(src_ipv4="10.0.0.0", dst_ipv4="10.0.0.1", ipv4_prefixlen=31).src_ipv4 == "10.0.0.0"


def test_config_dict_roundtrip():
    cfg = TestbedConfig(name="rt", src_ipv4="192.168.5.10", dst_ipv4="192.168.5.20")
    assert TestbedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown testbed config field"):
        TestbedConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="mapping"):
        TestbedConfig.from_dict(["rt"])


def test_state_file_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(tbmod, "STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tbmod.netns, "listing", lambda: [])
    assert list_testbeds() == []
    cfg = TestbedConfig(name="sf", dst_ipv4="10.77.0.99")
    Testbed(cfg)._write_state()
    assert os.path.exists(tmp_path / "state" / "testbed-sf.json")
    assert Testbed.load("sf").config == cfg
    assert list_testbeds() == ["sf"]
    with pytest.raises(TestbedError, match="no testbed 'other'"):
        Testbed.load("other")
    with pytest.raises(ValueError):
        Testbed.load("bad/name")
    (tmp_path / "state" / "testbed-broken.json").write_text("{not json")
    with pytest.raises(TestbedError, match="cannot read"):
        Testbed.load("broken")
    (tmp_path / "state" / "testbed-liar.json").write_text(json.dumps({"config": cfg.to_dict()}))
    with pytest.raises(TestbedError, match="describes testbed 'sf'"):
        Testbed.load("liar")
    assert Testbed(cfg)._remove_state() is True
    assert Testbed(cfg)._remove_state() is False


def test_list_testbeds_finds_orphaned_namespaces(tmp_path, monkeypatch):
    monkeypatch.setattr(tbmod, "STATE_DIR", str(tmp_path))
    monkeypatch.setattr(
        tbmod.netns, "listing", lambda: ["a-src", "a-dst", "a-node", "b-src", "other", "c-node"]
    )
    assert list_testbeds() == ["a"]


ETHTOOL_K = """Features for eth0:
rx-checksumming: on
tx-checksumming: off
\ttx-checksum-ipv4: off [fixed]
\ttx-checksum-ip-generic: off
scatter-gather: on
generic-receive-offload: on
large-receive-offload: off [fixed]
"""


def test_offloads_parsing(monkeypatch):
    calls = []

    def fake_run(name, argv, **kw):
        calls.append((name, argv))
        return subprocess.CompletedProcess(argv, 0, stdout=ETHTOOL_K, stderr="")

    monkeypatch.setattr(tbmod.netns, "run", fake_run)
    assert tbmod.offloads("x-src", "eth0") == {"gro": True, "tx_checksum": False}
    assert calls == [("x-src", ["ethtool", "-k", "eth0"])]
    monkeypatch.setattr(
        tbmod.netns, "run",
        lambda name, argv, **kw: subprocess.CompletedProcess(argv, 0, stdout="Features for eth0:\n", stderr=""),
    )
    with pytest.raises(TestbedError, match="generic-receive-offload"):
        tbmod.offloads("x-src", "eth0")


# ==========================================================================
# helpers for the root tests


def run_in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return netns.run(ns, list(argv), check=check)


def ip_json(ns: str, *args: str):
    return json.loads(run_in(ns, "ip", "-j", *args).stdout or "[]")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(ns: str, addr: str, timeout: float = 1.0) -> bool:
    """One ICMP/ICMPv6 echo from namespace `ns` to `addr`; True on a reply."""
    v6 = ":" in addr
    with netns.entered(ns):
        sock = socket.socket(
            socket.AF_INET6 if v6 else socket.AF_INET,
            socket.SOCK_RAW,
            socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP,
        )
    with sock:
        ident, seq, payload = os.getpid() & 0xFFFF, next(_counter) & 0xFFFF, os.urandom(16)
        request, reply = (128, 129) if v6 else (8, 0)
        msg = struct.pack("!BBHHH", request, 0, 0, ident, seq) + payload
        if not v6:  # the kernel fills in ICMPv6 checksums itself
            msg = msg[:2] + struct.pack("!H", _checksum(msg)) + msg[4:]
        sock.sendto(msg, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except (TimeoutError, socket.timeout):
                break
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # strip the IPv4 header
            if data[0] == reply and struct.unpack("!HH", data[4:8]) == (ident, seq) and data[8:] == payload:
                return True
    return False


def ping(ns: str, addr: str) -> bool:
    """`ip netns exec NS ping -c1 -W1 ADDR`, or the same in Python if ping is missing."""
    if shutil.which("ping"):
        return run_in(ns, "ping", "-c1", "-W1", addr, check=False).returncode == 0
    return icmp_echo(ns, addr, 1.0)


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def make_testbed():
    """Build testbeds with unique names; always tear them all down."""
    yield from making_testbeds(unique_name, lambda name: TestbedConfig(name=name))


@pytest.fixture(scope="module", autouse=True)
def no_namespaces_left_behind():
    yield
    left = remove_namespaces(_PREFIX)
    assert left == [], f"namespaces left behind: {left}"


# ==========================================================================
# root: the real thing


@pytest.mark.root
@pytest.mark.netns
class TestLive:
    def test_up_builds_namespaces_and_interfaces(self, make_testbed):
        tb = make_testbed()
        cfg = tb.config
        for ns in cfg.namespaces.values():
            assert netns.exists(ns)
            lo = ip_json(ns, "link", "show", "lo")[0]
            assert "UP" in lo["flags"], f"lo is down in {ns}"
        for role in ("src", "dst"):
            plan = cfg.host(role)
            ns = plan["netns"]
            links = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
            assert set(links) == {"lo", "eth0"}
            eth0 = links["eth0"]
            assert eth0["address"] == plan["mac"]
            assert "UP" in eth0["flags"] and eth0["operstate"] == "UP"
            addrs = ip_json(ns, "addr", "show", "dev", "eth0")[0]["addr_info"]
            got = {(a["family"], a["local"], a["prefixlen"]) for a in addrs}
            # exactly these: no link-local IPv6 address either
            assert got == {("inet", plan["ipv4"], 24), ("inet6", plan["ipv6"], 64)}
            for a in addrs:
                assert not a.get("tentative") and not a.get("dadfailed"), a
            neigh = {(n["dst"], n["lladdr"], tuple(n["state"])) for n in ip_json(ns, "neigh", "show", "dev", "eth0")}
            assert neigh == {
                (plan["peer_ipv4"], plan["peer_mac"], ("PERMANENT",)),
                (plan["peer_ipv6"], plan["peer_mac"], ("PERMANENT",)),
            }
            sysctl = run_in(ns, "sysctl", "-n", "net.ipv6.conf.eth0.accept_ra",
                            "net.ipv6.conf.eth0.router_solicitations",
                            "net.ipv6.conf.eth0.accept_dad").stdout.split()
            assert sysctl == ["0", "0", "0"]
        node = cfg.netns_name("node")
        links = {link["ifname"]: link for link in ip_json(node, "link", "show")}
        assert set(links) == {"lo", "ext0", "ext1"}
        for port, mac in (("ext0", cfg.port0_mac), ("ext1", cfg.port1_mac)):
            assert links[port]["address"] == mac
            assert "UP" in links[port]["flags"]
            assert ip_json(node, "addr", "show", "dev", port)[0].get("addr_info", []) == []
            assert run_in(node, "cat", f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6").stdout.strip() == "1"
        # each port is the veth peer of its host's eth0
        assert links["ext0"]["link_netnsid"] is not None
        src_eth0 = ip_json(cfg.netns_name("src"), "link", "show", "eth0")[0]
        assert src_eth0["link_index"] == links["ext0"]["ifindex"]
        dst_eth0 = ip_json(cfg.netns_name("dst"), "link", "show", "eth0")[0]
        assert dst_eth0["link_index"] == links["ext1"]["ifindex"]
        # no veth end shares its index with its peer (see PORT_IFINDEX)
        assert src_eth0["ifindex"] != links["ext0"]["ifindex"]
        assert dst_eth0["ifindex"] != links["ext1"]["ifindex"]
        # nothing of the testbed leaks into the namespace we run in
        assert not ({"ext0", "ext1"} & {link["ifname"] for link in json.loads(
            subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)})

    def test_hosts_quiet_after_up(self, make_testbed):
        """The hosts' start-up chatter (MLD reports) is over when up() returns,
        so a test counting frames at the node starts from silence.  Watched for
        longer than linkwatch's one-second rate limit."""
        from pyroute2 import IPRoute

        tb = make_testbed()
        with netns.entered(tb.config.netns_name("node")), IPRoute() as ipr:
            idx = [ipr.link_lookup(ifname=p)[0] for p in (tb.config.port0_ifname, tb.config.port1_ifname)]

            def rx():
                return [ipr.get_links(i)[0].get("IFLA_STATS64")["rx_packets"] for i in idx]

            before, end = rx(), time.monotonic() + 1.2
            while time.monotonic() < end:
                assert rx() == before, "frames reached the node's ports after up() returned"
                time.sleep(0.05)

    def test_host_offloads(self, make_testbed):
        tb = make_testbed()
        for role in ("src", "dst"):
            out = run_in(tb.config.netns_name(role), "ethtool", "-k", "eth0").stdout
            lines = {line.split(":")[0].strip(): line.split(":", 1)[1].split()[0]
                     for line in out.splitlines() if ":" in line and line.split(":", 1)[1].strip()}
            assert lines["generic-receive-offload"] == "on", out
            assert lines["tx-checksumming"] == "off", out

    def test_show_reports_live_system(self, make_testbed):
        tb = make_testbed()
        cfg = tb.config
        info = tb.show()
        assert info["name"] == tb.name and info["up"] is True and tb.is_up()
        assert info["namespaces"] == cfg.namespaces
        for role in ("src", "dst"):
            host, plan = info["hosts"][role], cfg.host(role)
            for key in ("netns", "ifname", "mac", "ipv4", "ipv6"):
                assert host[key] == plan[key], key
            live = ip_json(plan["netns"], "link", "show", "eth0")[0]
            assert host["ifindex"] == live["ifindex"]
            assert host["offloads"] == {"gro": True, "tx_checksum": False}
        assert info["node"]["netns"] == cfg.netns_name("node")
        links = {link["ifname"]: link for link in ip_json(cfg.netns_name("node"), "link", "show")}
        for port, mac in (("ext0", cfg.port0_mac), ("ext1", cfg.port1_mac)):
            p = info["node"]["ports"][port]
            assert (p["ifname"], p["mac"], p["ifindex"]) == (port, mac, links[port]["ifindex"])
        # the same from another process, through the state file
        code = ("import json, sys; from nfactor_xdp.tools.testbed import Testbed; "
                "print(json.dumps(Testbed.load(sys.argv[1]).show()))")
        other = subprocess.run([sys.executable, "-c", code, tb.name], capture_output=True, text=True, check=True)
        assert json.loads(other.stdout) == info
        assert tb.name in list_testbeds()
        # live, not from the state file: a vanished host shows
        netns.remove(cfg.netns_name("dst"))
        info = tb.show()
        assert info["up"] is False and not tb.is_up()
        assert info["hosts"]["dst"]["ifindex"] is None and info["hosts"]["dst"]["mac"] is None
        assert info["hosts"]["src"]["mac"] == cfg.src_mac

    def test_up_twice_raises(self, make_testbed):
        tb = make_testbed()
        with pytest.raises(TestbedExists, match=r"down\(\)"):
            tb.up()
        with pytest.raises(TestbedExists):
            Testbed(name=tb.name).up()
        assert tb.is_up(), "a refused second up must leave the first testbed alone"
        assert os.path.exists(tb.state_path)

    def test_up_refuses_leftover_namespace(self, make_testbed):
        tb = make_testbed(up=False)
        netns.create(tb.config.netns_name("dst"))
        with pytest.raises(TestbedExists, match=tb.config.netns_name("dst")):
            tb.up()
        assert not netns.exists(tb.config.netns_name("src"))
        assert tb.down() == [tb.config.netns_name("dst")]

    def test_failed_up_rolls_back(self, make_testbed, monkeypatch):
        tb = make_testbed(up=False)
        real = Testbed._build_host

        def broken(self, role):
            if role == "dst":
                raise RuntimeError("injected failure")
            return real(self, role)

        monkeypatch.setattr(Testbed, "_build_host", broken)
        with pytest.raises(RuntimeError, match="injected failure") as excinfo:
            tb.up()
        assert any("removed what was built" in note for note in getattr(excinfo.value, "__notes__", []))
        assert [ns for ns in tb.config.namespaces.values() if netns.exists(ns)] == []
        assert not os.path.exists(tb.state_path)

    def test_down_removes_everything_and_is_idempotent(self, make_testbed):
        tb = make_testbed()
        removed = tb.down()
        assert sorted(removed) == sorted([*tb.config.namespaces.values(), tb.state_path])
        assert [ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")] == []
        assert not os.path.exists(tb.state_path)
        assert tb.name not in list_testbeds()
        assert tb.down() == []
        info = tb.show()
        assert info["up"] is False and info["node"]["ports"]["ext0"]["ifindex"] is None

    def test_down_from_another_process(self, make_testbed):
        tb = make_testbed()
        code = "import sys; from nfactor_xdp.tools.testbed import Testbed; print(Testbed.load(sys.argv[1]).down())"
        subprocess.run([sys.executable, "-c", code, tb.name], check=True, capture_output=True)
        assert [ns for ns in tb.config.namespaces.values() if netns.exists(ns)] == []
        with pytest.raises(TestbedError):
            Testbed.load(tb.name)

    def test_testbeds_side_by_side(self, make_testbed):
        a, b = make_testbed(), make_testbed()  # same address plan, isolated
        assert a.is_up() and b.is_up()
        assert {a.name, b.name} <= set(list_testbeds())
        a.down()
        assert b.is_up()

    def test_connectivity_only_through_the_node(self, make_testbed):
        tb = make_testbed()
        cfg = tb.config
        src, dst, node = (cfg.netns_name(r) for r in ("src", "dst", "node"))
        # nothing attached to ext0/ext1: the hosts cannot reach each other
        for addr in (cfg.dst_ipv4, cfg.dst_ipv6):
            assert not ping(src, addr), f"{addr} reachable with nothing on the node"
        # a Linux bridge across the ports stands in for the node
        from pyroute2 import IPRoute

        with netns.entered(node), IPRoute() as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            with open("/proc/sys/net/ipv6/conf/br0/disable_ipv6", "w") as f:
                f.write("1\n")
            for port in (cfg.port0_ifname, cfg.port1_ifname):
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
            ipr.link("set", index=br, state="up")
        try:
            for ns, addr in ((src, cfg.dst_ipv4), (src, cfg.dst_ipv6), (dst, cfg.src_ipv4), (dst, cfg.src_ipv6)):
                wait_for(lambda: ping(ns, addr), 10.0, f"ping {addr} from {ns} across the bridge")
            # static entries: no ARP/ND happened, they are still the permanent ones
            states = {tuple(n["state"]) for n in ip_json(src, "neigh", "show", "dev", "eth0")}
            assert states == {("PERMANENT",)}
        finally:
            with netns.entered(node), IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname="br0"):
                    ipr.link("del", index=idx)
