"""Tests of the testbed's worker hosts (TestbedConfig.hosts, `testbed up --hosts N`):
the address plan without root, the fabric itself with."""
from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nfactor_xdp.cli import main
from nfactor_xdp.kern import netns
from nfactor_xdp.tools import testbed as tbmod
from nfactor_xdp.tools.testbed import MAX_HOSTS, Testbed, TestbedConfig, TestbedError, TestbedExists
from tests.helpers import making_testbeds, remove_namespaces

# Unique, short testbed names: "w<pid>_<n>" (at most 10 characters; not the
# "t<pid>_" of test_testbed.py, whose module cleanup would take ours).
_PREFIX = f"w{os.getpid() % 10000}_"
_counter = itertools.count()

IP_MTU_DISCOVER = 10  # <linux/in.h>; not in Python's socket module
IP_PMTUDISC_DO = 2
ETH_P_IP = 0x0800
FABRIC_MTU = 1600


def unique_name() -> str:
    return f"{_PREFIX}{next(_counter)}"


def expected_fabric(name: str, hosts: int) -> list[dict]:
    """The fabric addresses the task fixes, written out independently of the plan code."""
    out = [{"host": 0, "netns": f"{name}-node", "ifname": "fab0", "ipv4": "10.78.0.1", "mac": "02:78:00:00:00:01"}]
    for i in range(1, hosts + 1):
        out.append({"host": i, "netns": f"{name}-h{i}", "ifname": "fab0", "ipv4": f"10.78.0.{1 + i}",
                    "mac": f"02:78:00:00:00:{1 + i:02x}"})
    return out


KEYS = ("host", "netns", "ifname", "ipv4", "mac")


def project(entries: list[dict]) -> list[dict]:
    return [{k: e[k] for k in KEYS} for e in entries]


# ==========================================================================
# the address plan (no root)


def test_no_hosts_is_todays_testbed():
    cfg = TestbedConfig()
    assert cfg.hosts == 0
    assert cfg.namespaces == {"src": "nfx-src", "dst": "nfx-dst", "node": "nfx-node"}
    assert cfg.fabric_hosts() == [] and cfg.fabric() is None
    assert cfg.to_dict()["hosts"] == 0
    with pytest.raises(ValueError, match="no fabric"):
        cfg.fabric_host(0)
    with pytest.raises(ValueError):
        cfg.netns_name("fab")


@pytest.mark.parametrize("hosts", [-1, MAX_HOSTS + 1, 9, 100, "2", 2.0, True, None, [1]])
def test_bad_hosts_rejected(hosts):
    with pytest.raises(ValueError, match="hosts must be"):
        TestbedConfig(hosts=hosts)
    with pytest.raises(ValueError, match="hosts must be"):
        TestbedConfig.from_dict({**TestbedConfig().to_dict(), "hosts": hosts})


@pytest.mark.parametrize("hosts", range(0, MAX_HOSTS + 1))
def test_good_hosts_accepted(hosts):
    assert MAX_HOSTS == 7
    cfg = TestbedConfig(name="lab", hosts=hosts)
    assert cfg.hosts == hosts
    assert len(cfg.namespaces) == 3 + (hosts + 1 if hosts else 0)


def test_namespaces_with_hosts():
    cfg = TestbedConfig(name="lab", hosts=3)
    assert cfg.namespaces == {"src": "lab-src", "dst": "lab-dst", "node": "lab-node", "fab": "lab-fab",
                              "h1": "lab-h1", "h2": "lab-h2", "h3": "lab-h3"}
    assert cfg.fabric_netns == "lab-fab"
    assert [cfg.host_netns(i) for i in range(4)] == ["lab-node", "lab-h1", "lab-h2", "lab-h3"]
    with pytest.raises(ValueError):
        cfg.netns_name("h4")
    for bad in (-1, 4, "1", True):
        with pytest.raises(ValueError, match="fabric host"):
            cfg.fabric_host(bad)


def test_longest_name_keeps_rule():
    longest = "n" * tbmod.MAX_NAME_LEN
    cfg = TestbedConfig(name=longest, hosts=MAX_HOSTS)
    assert max(len(ns) for ns in cfg.namespaces.values()) == len(f"{longest}-node") == 15
    assert len(cfg.netns_name(f"h{MAX_HOSTS}")) < 15 and len(cfg.fabric_netns) < 15


@pytest.mark.parametrize("hosts", [1, 2, MAX_HOSTS])
def test_fabric_hosts_addresses(hosts):
    cfg = TestbedConfig(name="lab", hosts=hosts)
    entries = cfg.fabric_hosts()
    assert project(entries) == expected_fabric("lab", hosts)
    assert all(e["prefixlen"] == 24 for e in entries)
    assert [e["port"] for e in entries] == [f"p{i}" for i in range(hosts + 1)]
    assert len({e["port_mac"] for e in entries} | {e["mac"] for e in entries}) == 2 * (hosts + 1)
    assert [cfg.fabric_host(i) for i in range(hosts + 1)] == entries
    assert cfg.fabric() == {"netns": "lab-fab", "bridge": "br0", "mtu": 1600, "hosts": entries}
    # the list is a copy: callers may change it
    entries[0]["ipv4"] = "x"
    assert cfg.fabric_hosts()[0]["ipv4"] == "10.78.0.1"


def test_fabric_mac_clash_refused():
    assert TestbedConfig(port0_mac="02:78:00:00:00:01").port0_mac == "02:78:00:00:00:01"  # no fabric
    with pytest.raises(ValueError, match="MAC address of the fabric"):
        TestbedConfig(port0_mac="02:78:00:00:00:01", hosts=1)


def test_hosts_dict_roundtrip(tmp_path, monkeypatch):
    cfg = TestbedConfig(name="rt", hosts=3)
    assert cfg.to_dict()["hosts"] == 3
    assert TestbedConfig.from_dict(cfg.to_dict()) == cfg
    # a state file from before worker hosts existed
    old = {k: v for k, v in cfg.to_dict().items() if k != "hosts"}
    assert TestbedConfig.from_dict(old) == TestbedConfig(name="rt")
    # through the state file
    monkeypatch.setattr(tbmod, "STATE_DIR", str(tmp_path))
    Testbed(cfg)._write_state()
    assert Testbed.load("rt").config.hosts == 3
    (tmp_path / "testbed-old.json").write_text(json.dumps({"config": {**old, "name": "old"}}))
    assert Testbed.load("old").config.hosts == 0


@pytest.mark.parametrize("value", ["-1", "8", "x", "2.5"])
def test_cli_rejects_bad_hosts(value):
    r = CliRunner().invoke(main, ["testbed", "up", "--name", unique_name(), "--hosts", value])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--hosts'" in r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_cli_help_explains_hosts():
    r = CliRunner().invoke(main, ["testbed", "up", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for needle in ("--hosts", "0..7", "spanning several hosts", "10.78.0.1/24", "02:78:00:00:00:01", "NAME-fab"):
        assert needle in text, needle


# ==========================================================================
# helpers for the root tests


def ip_json(ns: str, *args: str):
    return json.loads(netns.run(ns, ["ip", "-j", *args]).stdout or "[]")


def udp_socket(ns: str, addr: str, port: int = 0) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    return sock


def recv_until(sock: socket.socket, deadline: float, bufsize: int = 4096):
    """recvfrom with a deadline; AssertionError when it passes."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError("deadline passed")
    sock.settimeout(left)
    try:
        return sock.recvfrom(bufsize)
    except (TimeoutError, socket.timeout):
        raise AssertionError(f"nothing received on {sock.getsockname()} in time") from None


def udp_exchange(ns_a: str, ip_a: str, ns_b: str, ip_b: str, timeout: float = 3.0) -> None:
    """A datagram from a to b and b's answer back, both checked."""
    deadline = time.monotonic() + timeout
    with udp_socket(ns_a, ip_a) as a, udp_socket(ns_b, ip_b) as b:
        request = os.urandom(32)
        a.sendto(request, b.getsockname())
        data, peer = recv_until(b, deadline)
        assert data == request and peer == a.getsockname()
        b.sendto(data[::-1], peer)
        data, peer = recv_until(a, deadline)
        assert data == request[::-1] and peer == b.getsockname()


@pytest.fixture
def make_testbed():
    """Build testbeds with unique names; always tear them all down."""
    yield from making_testbeds(unique_name, lambda name, hosts=2: TestbedConfig(name=name, hosts=hosts))


@pytest.fixture(scope="module", autouse=True)
def no_namespaces_left_behind():
    yield
    left = remove_namespaces(_PREFIX)
    assert left == [], f"namespaces left behind: {left}"


# ==========================================================================
# root: the real thing


@pytest.mark.root
@pytest.mark.netns
class TestFabricLive:
    def test_up_builds_the_fabric(self, make_testbed):
        tb = make_testbed(2)
        name = tb.name
        want = [f"{name}-{r}" for r in ("src", "dst", "node", "fab", "h1", "h2")]
        assert sorted(ns for ns in netns.listing() if ns.startswith(f"{name}-")) == sorted(want)
        for ns in (f"{name}-fab", f"{name}-h1", f"{name}-h2"):
            assert "UP" in ip_json(ns, "link", "show", "lo")[0]["flags"], f"lo is down in {ns}"
        plan = expected_fabric(name, 2)
        fab_links = {link["ifname"]: link for link in ip_json(f"{name}-fab", "-d", "link", "show")}
        assert set(fab_links) == {"lo", "br0", "p0", "p1", "p2"}
        br0 = fab_links["br0"]
        assert "UP" in br0["flags"] and br0["mtu"] == FABRIC_MTU
        data = br0["linkinfo"]["info_data"]
        assert data["stp_state"] == 0 and data["forward_delay"] == 0
        for host in plan:
            ns = host["netns"]
            links = {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}
            assert set(links) == ({"lo", "ext0", "ext1", "fab0"} if host["host"] == 0 else {"lo", "fab0"})
            fab0 = links["fab0"]
            assert fab0["mtu"] == FABRIC_MTU, f"fab0 MTU in {ns}"
            assert fab0["address"] == host["mac"]
            assert "UP" in fab0["flags"] and fab0["operstate"] == "UP"
            assert (fab0["num_tx_queues"], fab0["num_rx_queues"]) == (1, 1)
            addrs = ip_json(ns, "addr", "show", "dev", "fab0")[0]["addr_info"]
            assert {(a["family"], a["local"], a["prefixlen"]) for a in addrs} == {("inet", host["ipv4"], 24)}
            assert netns.run(ns, ["sysctl", "-n", "net.ipv6.conf.fab0.disable_ipv6"]).stdout.strip() == "1"
            neigh = {(n["dst"], n["lladdr"], tuple(n["state"])) for n in ip_json(ns, "neigh", "show", "dev", "fab0")}
            assert neigh == {(o["ipv4"], o["mac"], ("PERMANENT",)) for o in plan if o is not host}
            k = netns.run(ns, ["ethtool", "-k", "fab0"]).stdout
            assert "generic-receive-offload: on" in k and "tx-checksumming: off" in k, k
            # the bridge port on the other end
            port = fab_links[f"p{host['host']}"]
            assert fab0["link_index"] == port["ifindex"] and port["ifindex"] != fab0["ifindex"]
            assert port["master"] == "br0" and port["mtu"] == FABRIC_MTU and "UP" in port["flags"]
            assert (port["num_tx_queues"], port["num_rx_queues"]) == (1, 1)
            assert port["linkinfo"]["info_slave_data"]["state"] == "forwarding"
            assert port.get("xdp", {}).get("prog", {}).get("name") == "nfx_host_pass", port.get("xdp")
            sysctl = f"net.ipv6.conf.p{host['host']}.disable_ipv6"
            assert netns.run(f"{name}-fab", ["sysctl", "-n", sysctl]).stdout.strip() == "1"
        assert netns.run(f"{name}-fab", ["sysctl", "-n", "net.ipv6.conf.br0.disable_ipv6"]).stdout.strip() == "1"
        # nothing of the fabric shows in the namespace we run in
        here = {link["ifname"] for link in json.loads(
            subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)}
        assert not ({"fab0", "p0", "p1", "p2"} & here), here

    def test_udp_between_node_and_workers(self, make_testbed):
        tb = make_testbed(2)
        node, *workers = tb.config.fabric_hosts()
        for w in workers:
            udp_exchange(node["netns"], node["ipv4"], w["netns"], w["ipv4"])
            udp_exchange(w["netns"], w["ipv4"], node["netns"], node["ipv4"])
        udp_exchange(workers[0]["netns"], workers[0]["ipv4"], workers[1]["netns"], workers[1]["ipv4"])
        # no ARP happened: the neighbour entries are still the permanent ones, and only those
        for h in tb.config.fabric_hosts():
            states = {tuple(n["state"]) for n in ip_json(h["netns"], "neigh", "show", "dev", "fab0")}
            assert states == {("PERMANENT",)}, h["netns"]

    def test_big_datagram_unfragmented(self, make_testbed):
        """A 1560-byte IPv4 UDP datagram with DF set reaches a worker as one
        frame; one byte over the MTU of 1600 is refused by the sender."""
        tb = make_testbed(2)
        node, w1, _ = tb.config.fabric_hosts()
        deadline = time.monotonic() + 3.0
        with netns.entered(w1["netns"]):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        with raw, udp_socket(node["netns"], node["ipv4"]) as a, udp_socket(w1["netns"], w1["ipv4"]) as b:
            raw.bind(("fab0", ETH_P_IP))
            a.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # DF, never fragment
            payload = os.urandom(1560 - 20 - 8)
            a.sendto(payload, b.getsockname())
            data, peer = recv_until(b, deadline, 4096)
            assert data == payload and peer == a.getsockname()
            # the frame on the worker's fab0: one IPv4 packet of 1560 bytes, DF, not a fragment
            while True:
                pkt, _ = recv_until(raw, deadline, 4096)
                if pkt[9] == socket.IPPROTO_UDP and pkt[12:16] == socket.inet_aton(node["ipv4"]) \
                        and struct.unpack("!H", pkt[22:24])[0] == b.getsockname()[1]:
                    break
            total_len, frag = struct.unpack("!H2xH", pkt[2:8])
            assert total_len == 1560 == len(pkt)
            assert frag & 0x4000, "DF not set"
            assert frag & 0x3FFF == 0, f"a fragment (flags/offset {frag:#06x})"
            # the path's MTU is 1600, no more
            with pytest.raises(OSError) as excinfo:
                a.sendto(os.urandom(FABRIC_MTU - 20 - 8 + 1), b.getsockname())
            assert excinfo.value.errno == 90  # EMSGSIZE

    def test_show_lists_the_fabric(self, make_testbed):
        tb = make_testbed(2)
        info = tb.show()
        assert info["up"] is True and tb.is_up()
        assert info["namespaces"] == tb.config.namespaces
        fabric = info["fabric"]
        assert (fabric["netns"], fabric["bridge"], fabric["mtu"], fabric["up"]) == (f"{tb.name}-fab", "br0", 1600, True)
        assert project(fabric["hosts"]) == expected_fabric(tb.name, 2)
        for h in fabric["hosts"]:
            live = ip_json(h["netns"], "link", "show", "fab0")[0]
            assert (h["ifindex"], h["mtu"], h["up"]) == (live["ifindex"], 1600, True)
            assert h["offloads"] == {"gro": True, "tx_checksum": False}
        # the same from another process, through the state file
        code = ("import json, sys; from nfactor_xdp.tools.testbed import Testbed; "
                "print(json.dumps(Testbed.load(sys.argv[1]).show()))")
        other = subprocess.run([sys.executable, "-c", code, tb.name], capture_output=True, text=True, check=True)
        assert json.loads(other.stdout) == info
        # ... and from the CLI
        r = CliRunner().invoke(main, ["testbed", "show", "--name", tb.name, "--json"])
        assert r.exit_code == 0, r.output
        assert project(json.loads(r.output)["fabric"]["hosts"]) == expected_fabric(tb.name, 2)
        # live, not from the plan: a vanished worker shows
        netns.remove(f"{tb.name}-h2")
        info = tb.show(with_offloads=False)
        assert info["up"] is False and info["fabric"]["up"] is False
        h2 = info["fabric"]["hosts"][2]
        assert (h2["netns"], h2["ipv4"], h2["mac"], h2["ifindex"]) == (f"{tb.name}-h2", None, None, None)
        assert info["fabric"]["hosts"][1]["ipv4"] == "10.78.0.2"

    def test_no_hosts_no_fabric(self, make_testbed):
        tb = make_testbed(0)
        info = tb.show(with_offloads=False)
        assert info["up"] is True and "fabric" not in info
        assert sorted(ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")) == \
            sorted(f"{tb.name}-{r}" for r in ("src", "dst", "node"))
        assert {link["ifname"] for link in ip_json(f"{tb.name}-node", "link", "show")} == {"lo", "ext0", "ext1"}

    def test_node_fabric_quiet_after_up(self, make_testbed):
        """No start-up chatter reaches the node's fab0 after up() returns."""
        from pyroute2 import IPRoute

        tb = make_testbed(2)
        with netns.entered(tb.config.netns_name("node")), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="fab0")[0]

            def rx():
                return ipr.get_links(idx)[0].get("IFLA_STATS64")["rx_packets"]

            before, end = rx(), time.monotonic() + 1.2
            while time.monotonic() < end:
                assert rx() == before, "frames reached the node's fab0 after up() returned"
                time.sleep(0.05)

    def test_down_removes_everything(self, make_testbed):
        tb = make_testbed(2)
        removed = tb.down()
        want = [f"{tb.name}-{r}" for r in ("src", "dst", "node", "fab", "h1", "h2")]
        assert sorted(removed) == sorted([*want, tb.state_path])
        assert [ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")] == []
        assert not os.path.exists(tb.state_path)
        assert tb.down() == []

    def test_down_without_state_file_removes_the_fabric(self, make_testbed):
        """A testbed whose state file is lost (so down() runs with the default
        plan, hosts=0, as `nfactorctl testbed down` then does) still goes whole."""
        tb = make_testbed(2)
        os.unlink(tb.state_path)
        r = CliRunner().invoke(main, ["testbed", "down", "--name", tb.name])
        assert r.exit_code == 0, r.output
        assert [ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")] == []

    def test_up_twice_refuses(self, make_testbed):
        tb = make_testbed(2)
        with pytest.raises(TestbedExists):
            tb.up()
        with pytest.raises(TestbedExists):
            Testbed(TestbedConfig(name=tb.name, hosts=1)).up()
        r = CliRunner().invoke(main, ["testbed", "up", "--name", tb.name, "--hosts", "2"])
        assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
        assert tb.is_up(), "a refused second up must leave the first testbed alone"
        assert os.path.exists(tb.state_path)

    def test_up_refuses_leftover_worker_namespace(self, make_testbed):
        tb = make_testbed(2, up=False)
        netns.create(f"{tb.name}-h2")
        with pytest.raises(TestbedExists, match=f"{tb.name}-h2"):
            tb.up()
        assert [ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")] == [f"{tb.name}-h2"]
        assert tb.down() == [f"{tb.name}-h2"]

    def test_failed_up_rolls_back(self, make_testbed, monkeypatch):
        tb = make_testbed(2, up=False)
        real = Testbed._build_fabric_host

        def broken(self, entry):
            if entry["host"] == 2:
                raise RuntimeError("injected failure")
            return real(self, entry)

        monkeypatch.setattr(Testbed, "_build_fabric_host", broken)
        with pytest.raises(RuntimeError, match="injected failure") as excinfo:
            tb.up()
        assert any("removed what was built" in note for note in getattr(excinfo.value, "__notes__", []))
        assert [ns for ns in netns.listing() if ns.startswith(f"{tb.name}-")] == []
        assert not os.path.exists(tb.state_path)
        with pytest.raises(TestbedError):
            Testbed.load(tb.name)


def test_worker_hosts_fit_the_switchs_host_table():
    from nfactor_xdp.cli import testbed as cli_testbed
    from nfactor_xdp.kern import layouts as L
    assert MAX_HOSTS == cli_testbed.MAX_HOSTS == L.C["NFX_MAX_HOSTS"] - 1
