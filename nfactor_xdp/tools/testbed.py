"""The built-in default testbed: two hosts and the node, in three namespaces.

The node is a bump in the wire between a source host and a sink host:

    NAME-src                 NAME-node                 NAME-dst
    eth0  <--- veth --->  ext0   ext1  <--- veth --->  eth0
    10.77.0.1/24                                       10.77.0.2/24
    fd77::1/64                                         fd77::2/64

The node's ports carry no addresses and have IPv6 disabled: whatever the node
attaches to them (XDP) is the only thing that moves frames between the hosts.

Host details that matter (see the platform notes):
- each host's eth0 gets an XDP_PASS program (bpf/host_pass.c, attached with
  kern.loader.attach_pass) so that the veth has NAPI: frames the node
  XDP-redirects into ext0/ext1 are then received by the host instead of
  silently vanishing.  GRO, which gives a veth NAPI on some kernels, did not
  on this one; it is still switched on (and `up` checks it);
- transmit checksum offload is off on the hosts' eth0: partial checksums are
  not completed across the XDP/AF_XDP path;
- IPv6 addresses are added without DAD, with no link-local address and no
  router solicitations, and both hosts hold permanent neighbour entries for
  each other, so a test's traffic needs no ARP or ND.

With `hosts` N > 0 (TestbedConfig.hosts, `nfactorctl testbed up --hosts N`)
the node also gets worker hosts, for a node spanning several hosts: a fabric
namespace NAME-fab holds a Linux bridge br0 (STP off, forward delay 0, MTU
1600) and one veth per host, p{i} on the bridge and fab0 in the host:

    NAME-node  fab0 10.78.0.1/24  02:78:00:00:00:01  <--> p0 --+
    NAME-h1    fab0 10.78.0.2/24  02:78:00:00:00:02  <--> p1 --+-- br0 in NAME-fab
    ...                                                        |
    NAME-hN    fab0 10.78.0.{1+N}/24                 <--> pN --+

MTU 1600 throughout, IPv6 off, permanent neighbour entries for every other
host (no ARP), GRO on and tx checksumming off on fab0, and an XDP_PASS program
on every bridge port p{i} (frames a host XDP-redirects into its fab0 are then
received by the bridge).  TestbedConfig.fabric_hosts() gives the addresses
without a live testbed; show()["fabric"] reads them back.

The address plan and its validation are in testbed_plan.py, reading the live
testbed back (`show`) in testbed_inspect.py; both are re-exported here.  The
configuration is kept in a state file under STATE_DIR so that `show` and
`down` work from another process (`Testbed.load(name)`).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..kern import netns
from ..kern.loader import attach_pass
from . import testbed_inspect
from .testbed_inspect import ethtool, link_index, offloads
from .testbed_plan import (FABRIC_BRIDGE, FABRIC_IFNAME, FABRIC_MTU, FABRIC_ROLE, HOSTS, IFNAMSIZ, MAX_HOSTS,
                           MAX_NAME_LEN, PORTS, ROLES, TestbedConfig, TestbedConfigError, TestbedError, TestbedExists,
                           validate_hosts, validate_ifname, validate_name)

__all__ = ["FABRIC_BRIDGE", "FABRIC_IFNAME", "FABRIC_MTU", "HOSTS", "IFNAMSIZ", "MAX_HOSTS", "MAX_NAME_LEN", "PORTS",
           "ROLES", "STATE_DIR", "Testbed", "TestbedConfig", "TestbedConfigError", "TestbedError", "TestbedExists",
           "list_testbeds", "offloads", "state_path", "validate_hosts", "validate_ifname", "validate_name"]

STATE_DIR = "/run/nfactor"

# The node's ports get these interface indexes, so that no veth end has the
# same index as its peer (a host's eth0 is 2 in its fresh namespace).  Linux
# delays a carrier change by up to a second (linkwatch's rate limit) when it
# is not "urgent", and a device whose ifindex equals its iflink (the peer's
# index) is not urgent: with both ends at index 2, the host's IPv6 saw its
# link come up (and sent its MLD reports) up to a second late.
PORT_IFINDEX = (10, 11)
# The fabric's bridge port p{i} gets index FABRIC_PORT_IFINDEX + i in the
# fabric's namespace, for the same reason: never its peer fab0's index (2 in
# a worker's namespace, after ext0/ext1 in the node's).
FABRIC_PORT_IFINDEX = 20
BR_STATE_FORWARDING = 3

# IPv6 settings of the hosts' interfaces.  Quiet: no router solicitations or
# autoconf, no DAD, no link-local address (the static neighbour entries need
# no ND); and the MLD reports that cannot be avoided go out at once instead of
# over the next second or two (report intervals of 1 ms instead of 1 s).
HOST_IPV6_CONF = (
    ("accept_ra", 0),
    ("router_solicitations", 0),
    ("accept_dad", 0),
    ("addr_gen_mode", 1),  # none
    ("mldv1_unsolicited_report_interval", 1),
    ("mldv2_unsolicited_report_interval", 1),
)

IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"testbed-{validate_name(name)}.json")


def list_testbeds() -> list[str]:
    """Testbeds known on this machine: those with a state file, plus those whose
    three namespaces exist without one (e.g. after the state file was lost)."""
    names: set[str] = set()
    try:
        entries = os.listdir(STATE_DIR)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        m = re.match(r"^testbed-(.+)\.json$", entry)
        if m:
            try:
                names.add(validate_name(m.group(1)))
            except ValueError:
                pass
    present = set(netns.listing())
    for ns in present:
        if ns.endswith("-node"):
            name = ns[: -len("-node")]
            if f"{name}-src" in present and f"{name}-dst" in present:
                try:
                    names.add(validate_name(name))
                except ValueError:
                    pass
    return sorted(names)


# --------------------------------------------------------------------------
# helpers that run inside a namespace


def _sysctl_set(key: str, value: int | str) -> None:
    """Write /proc/sys/net/<key> of the calling thread's namespace."""
    with open(f"/proc/sys/net/{key}", "w") as f:
        f.write(f"{value}\n")


class Testbed:
    __test__ = False  # not a pytest test class despite the name

    def __init__(self, config: TestbedConfig | None = None, name: str | None = None):
        if config is None:
            config = TestbedConfig() if name is None else TestbedConfig(name=name)
        elif name is not None and name != config.name:
            config = dataclasses.replace(config, name=name)
        self.config = config

    def __repr__(self) -> str:
        return f"Testbed(name={self.name!r})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def namespaces(self) -> dict[str, str]:
        return self.config.namespaces

    @property
    def state_path(self) -> str:
        return state_path(self.name)

    # state file ------------------------------------------------------------
    @classmethod
    def load(cls, name: str) -> "Testbed":
        """The testbed `name` as recorded by `up` (possibly in another process)."""
        path = state_path(name)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise TestbedError(f"no testbed {name!r}: state file {path} not found") from None
        except (OSError, ValueError) as e:
            raise TestbedError(f"cannot read testbed state {path}: {e}") from None
        try:
            config = TestbedConfig.from_dict(data["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise TestbedError(f"bad testbed state {path}: {e}") from None
        if config.name != name:
            raise TestbedError(f"bad testbed state {path}: it describes testbed {config.name!r}")
        return cls(config)

    def _write_state(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        path = self.state_path
        tmp = f"{path}.{os.getpid()}.tmp"
        data = {"version": 1, "created": time.time(), "config": self.config.to_dict()}
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def _remove_state(self) -> bool:
        try:
            os.unlink(self.state_path)
            return True
        except FileNotFoundError:
            return False

    # up ----------------------------------------------------------------------
    def up(self) -> dict:
        """Build the testbed; return `show()`.

        Raises TestbedExists if any of its namespaces exists already.  A failure
        half-way removes what this call built and re-raises the error."""
        cfg = self.config
        present = [ns for ns in cfg.namespaces.values() if netns.exists(ns)]
        if present:
            raise TestbedExists(
                f"testbed {cfg.name!r} already exists (namespace(s) {', '.join(present)}); "
                f"remove it first with Testbed(name={cfg.name!r}).down() "
                f"(or: " + "; ".join(f"ip netns delete {ns}" for ns in present) + ")"
            )
        created: list[str] = []
        wrote_state = False
        step = "starting"
        try:
            # the namespaces first: creating one fails if it exists, which
            # claims the name before the state file is (over)written
            for role in cfg.roles:
                step = f"creating namespace {cfg.netns_name(role)}"
                try:
                    netns.create(cfg.netns_name(role))
                except netns.NetnsError as e:  # lost a race with another `up`
                    raise TestbedExists(str(e)) from None
                created.append(cfg.netns_name(role))
            step = "writing the state file"
            self._write_state()
            wrote_state = True
            for role in HOSTS:
                step = f"preparing host {cfg.netns_name(role)}"
                self._prepare_host(role)
            step = "creating the veth pairs"
            self._build_node()
            for role in HOSTS:
                step = f"configuring host {cfg.netns_name(role)}"
                self._build_host(role)
            if cfg.hosts:
                step = f"building the fabric in {cfg.fabric_netns}"
                self._build_fabric()
                for entry in cfg.fabric_hosts():
                    step = f"connecting {entry['netns']} to the fabric"
                    self._build_fabric_host(entry)
            step = "checking host offloads"
            self._check_offloads()
            step = "waiting for the links to come up"
            self._wait_links_up()
            step = "waiting for the hosts to fall quiet"
            self._settle()
        except BaseException as e:
            e.add_note(f"testbed {cfg.name!r}: failed while {step}; removed what was built")
            self._rollback(created, wrote_state)
            if isinstance(e, NetlinkError):  # the kernel said no: a TestbedError, not a crash
                raise TestbedError(f"testbed {cfg.name!r}: failed while {step} (removed what was built): "
                                   f"netlink error {e.code}: {os.strerror(e.code)}") from e
            raise
        return self.show()

    def _rollback(self, created: list[str], wrote_state: bool) -> None:
        for ns in reversed(created):
            try:
                netns.remove(ns)
            except Exception:
                pass
        if wrote_state:
            self._remove_state()

    def _build_node(self) -> None:
        cfg = self.config
        node = cfg.netns_name("node")
        pairs = [
            (cfg.port0_ifname, PORT_IFINDEX[0], cfg.port0_mac, cfg.netns_name("src"), cfg.src_mac),
            (cfg.port1_ifname, PORT_IFINDEX[1], cfg.port1_mac, cfg.netns_name("dst"), cfg.dst_mac),
        ]
        with netns.entered(node), IPRoute() as ipr:
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
            for port, ifindex, port_mac, host_ns, host_mac in pairs:
                # The veth is created in the node's namespace with its peer
                # placed straight into the host's: no end ever shows up in
                # the caller's namespace, so testbeds cannot collide there.
                fd = os.open(netns.path(host_ns), os.O_RDONLY)
                try:
                    ipr.link(
                        "add",
                        ifname=port,
                        index=ifindex,
                        kind="veth",
                        address=port_mac,
                        # One queue, as a NIC's RSS would give one flow: with
                        # several, a veth picks the queue by sending CPU and
                        # frames of one flow could be handled out of order.
                        num_tx_queues=1,
                        num_rx_queues=1,
                        peer={"ifname": cfg.host_ifname, "address": host_mac, "net_ns_fd": fd,
                              "num_tx_queues": 1, "num_rx_queues": 1},
                    )
                finally:
                    os.close(fd)
                # before the link goes up, so it never gets a link-local address
                _sysctl_set(f"ipv6/conf/{port}/disable_ipv6", 1)
            for port, *_ in pairs:
                ipr.link("set", index=link_index(ipr, port), state="up")

    def _prepare_host(self, role: str) -> None:
        """Before the host's interface exists: lo up, and IPv6 defaults that
        the interface inherits when it is born in this namespace."""
        with netns.entered(self.config.netns_name(role)), IPRoute() as ipr:
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
            for key, value in HOST_IPV6_CONF:
                _sysctl_set(f"ipv6/conf/default/{key}", value)

    def _build_host(self, role: str) -> None:
        h = self.config.host(role)
        ns, ifname = h["netns"], h["ifname"]
        with netns.entered(ns), IPRoute() as ipr:
            idx = link_index(ipr, ifname)
            if idx is None:
                raise TestbedError(f"{ifname} did not appear in {ns}")
            for key, value in HOST_IPV6_CONF:
                _sysctl_set(f"ipv6/conf/{ifname}/{key}", value)
            # offloads before the link carries traffic
            ethtool(ns, ["-K", ifname, "tx", "off", "gro", "on"])
            # GRO alone does not give this kernel's veth NAPI for frames the
            # node XDP-redirects into ext0/ext1 (they vanish, err -95): an
            # XDP_PASS program does.
            attach_pass(ifname, ns)
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=h["ipv4"], prefixlen=self.config.ipv4_prefixlen)
            ipr.addr("add", index=idx, address=h["ipv6"], prefixlen=self.config.ipv6_prefixlen,
                     flags=IFA_F_NODAD)
            # after the link is up: taking a link down flushes even permanent entries
            for family, dst in ((socket.AF_INET, h["peer_ipv4"]), (socket.AF_INET6, h["peer_ipv6"])):
                ipr.neigh("add", family=family, dst=dst, lladdr=h["peer_mac"], ifindex=idx,
                          state=NUD_PERMANENT)

    def _build_fabric(self) -> None:
        """The fabric's bridge, and one veth per host from a bridge port p{i}
        to the host's fab0 (up, but the hosts' ends are configured by
        _build_fabric_host)."""
        cfg = self.config
        fab = cfg.fabric_netns
        entries = cfg.fabric_hosts()
        for entry in entries[1:]:  # the workers (the node's lo is up already)
            with netns.entered(entry["netns"]), IPRoute() as ipr:
                ipr.link("set", index=link_index(ipr, "lo"), state="up")
        with netns.entered(fab), IPRoute() as ipr:
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
            # no STP (no BPDUs, and ports forward at once), no multicast snooping
            ipr.link("add", ifname=FABRIC_BRIDGE, kind="bridge", mtu=FABRIC_MTU,
                     br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
            _sysctl_set(f"ipv6/conf/{FABRIC_BRIDGE}/disable_ipv6", 1)
            # A switch forwards frames as they are.  With br_netfilter loaded (by
            # a container runtime, say) a Linux bridge would check bridged IPv4
            # headers and drop bad ones, hiding them from the node.
            for table in ("iptables", "ip6tables", "arptables"):
                if os.path.exists(f"/proc/sys/net/bridge/bridge-nf-call-{table}"):
                    _sysctl_set(f"bridge/bridge-nf-call-{table}", 0)
            bridge = link_index(ipr, FABRIC_BRIDGE)
            for entry in entries:
                # created here with the peer placed straight into the host's
                # namespace, as _build_node does: nothing shows in the caller's
                fd = os.open(netns.path(entry["netns"]), os.O_RDONLY)
                try:
                    ipr.link(
                        "add",
                        ifname=entry["port"],
                        index=FABRIC_PORT_IFINDEX + entry["host"],
                        kind="veth",
                        address=entry["port_mac"],
                        mtu=FABRIC_MTU,
                        num_tx_queues=1,  # one queue: frames of a flow stay in order
                        num_rx_queues=1,
                        peer={"ifname": entry["ifname"], "address": entry["mac"], "mtu": FABRIC_MTU,
                              "net_ns_fd": fd, "num_tx_queues": 1, "num_rx_queues": 1},
                    )
                finally:
                    os.close(fd)
                # before the link goes up, so it never gets a link-local address
                _sysctl_set(f"ipv6/conf/{entry['port']}/disable_ipv6", 1)
                ipr.link("set", index=link_index(ipr, entry["port"]), master=bridge)
        # NAPI for the bridge ports: frames a host XDP-redirects into its fab0
        # are only received by p{i} if p{i} has an XDP program
        for entry in entries:
            attach_pass(entry["port"], fab)
        with netns.entered(fab), IPRoute() as ipr:
            for entry in entries:
                ipr.link("set", index=link_index(ipr, entry["port"]), state="up")
            ipr.link("set", index=link_index(ipr, FABRIC_BRIDGE), state="up")

    def _build_fabric_host(self, entry: dict) -> None:
        """Configure a host's fab0: no IPv6, offloads as the hosts' eth0, up,
        its address, and permanent neighbour entries for every other host."""
        ns, ifname = entry["netns"], entry["ifname"]
        others = [e for e in self.config.fabric_hosts() if e["host"] != entry["host"]]
        with netns.entered(ns), IPRoute() as ipr:
            idx = link_index(ipr, ifname)
            if idx is None:
                raise TestbedError(f"{ifname} did not appear in {ns}")
            _sysctl_set(f"ipv6/conf/{ifname}/disable_ipv6", 1)  # before the link goes up
            ethtool(ns, ["-K", ifname, "tx", "off", "gro", "on"])
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=entry["ipv4"], prefixlen=entry["prefixlen"])
            # after the link is up: taking a link down flushes even permanent entries
            for other in others:
                ipr.neigh("add", family=socket.AF_INET, dst=other["ipv4"], lladdr=other["mac"], ifindex=idx,
                          state=NUD_PERMANENT)

    def _check_offloads(self) -> None:
        checks = [(self.config.netns_name(role), self.config.host_ifname) for role in HOSTS]
        checks += [(entry["netns"], entry["ifname"]) for entry in self.config.fabric_hosts()]
        for ns, ifname in checks:
            got = offloads(ns, ifname)
            if not got["gro"] or got["tx_checksum"]:
                raise TestbedError(
                    f"{ifname} in {ns}: wanted GRO on and tx checksumming off, "
                    f"ethtool reports gro={'on' if got['gro'] else 'off'}, "
                    f"tx-checksumming={'on' if got['tx_checksum'] else 'off'}"
                )

    def _wait_links_up(self, deadline: float = 3.0) -> None:
        """Poll until all interfaces report operstate UP (carrier seen), and
        the fabric's bridge ports forward."""
        cfg = self.config
        links = [(cfg.netns_name("node"), cfg.port0_ifname), (cfg.netns_name("node"), cfg.port1_ifname),
                 (cfg.netns_name("src"), cfg.host_ifname), (cfg.netns_name("dst"), cfg.host_ifname)]
        ports = []
        if cfg.hosts:
            links += [(entry["netns"], entry["ifname"]) for entry in cfg.fabric_hosts()]
            ports = [entry["port"] for entry in cfg.fabric_hosts()]
            links += [(cfg.fabric_netns, port) for port in ports] + [(cfg.fabric_netns, FABRIC_BRIDGE)]
        end = time.monotonic() + deadline
        for ns, ifname in links:
            with netns.entered(ns), IPRoute() as ipr:
                idx = link_index(ipr, ifname)
                while True:
                    link = ipr.get_links(idx)[0]
                    state = link.get("IFLA_OPERSTATE")
                    if ifname in ports and ns == cfg.fabric_netns and state == "UP":
                        brstate = testbed_inspect.bridge_port_state(link)
                        if brstate != BR_STATE_FORWARDING:
                            state = f"UP, bridge port state {brstate}"
                    if state == "UP":
                        break
                    if time.monotonic() >= end:
                        raise TestbedError(f"{ifname} in {ns} is still {state} after {deadline} s")
                    time.sleep(0.005)

    def _settle(self, quiet: float = 0.1, deadline: float = 2.0) -> None:
        """Wait until no frame has reached the node's ports for `quiet` seconds.

        The hosts send a few MLD reports after their link and address come up
        (the report interval is shortened to 1 ms above, so they are over in
        some 20 ms); waiting here means a test that counts frames at the node
        starts from silence."""
        cfg = self.config
        watched = [cfg.port0_ifname, cfg.port1_ifname] + ([FABRIC_IFNAME] if cfg.hosts else [])
        with netns.entered(cfg.netns_name("node")), IPRoute() as ipr:
            indexes = [link_index(ipr, p) for p in watched]

            def counters() -> list[int]:
                return [ipr.get_links(i)[0].get("IFLA_STATS64")["rx_packets"] for i in indexes]

            end = time.monotonic() + deadline
            last, since = counters(), time.monotonic()
            while time.monotonic() < end:
                time.sleep(0.01)
                now = counters()
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since >= quiet:
                    return

    # down --------------------------------------------------------------------
    def _all_namespaces(self) -> list[str]:
        """The namespaces down() removes: the configuration's, and any fabric
        namespace NAME-fab, NAME-h1..NAME-h8 left over (e.g. by a testbed with
        more hosts whose state file was lost)."""
        cfg = self.config
        names = [cfg.netns_name(role) for role in ("node", "src", "dst")]
        names += [f"{cfg.name}-{FABRIC_ROLE}"] + [f"{cfg.name}-h{i}" for i in range(1, MAX_HOSTS + 1)]
        return names

    def down(self) -> list[str]:
        """Remove the testbed's namespaces (the veths go with them) and its state
        file.  Idempotent; missing pieces are fine.  Returns what it removed."""
        cfg = self.config
        removed: list[str] = []
        errors: list[str] = []
        node = cfg.netns_name("node")
        fab = f"{cfg.name}-{FABRIC_ROLE}"
        # Cut the wires first: a process still inside a namespace keeps it (and
        # its veths) alive after the name is gone.
        for ns, wanted in ((node, lambda n: n in (cfg.port0_ifname, cfg.port1_ifname, FABRIC_IFNAME)),
                           (fab, lambda n: n == FABRIC_BRIDGE or re.fullmatch(r"p\d+", n) is not None)):
            if not netns.exists(ns):
                continue
            try:
                with netns.entered(ns), IPRoute() as ipr:
                    for link in ipr.get_links():
                        if not wanted(link.get_attr("IFLA_IFNAME") or ""):
                            continue
                        try:
                            ipr.link("del", index=link["index"])
                        except NetlinkError as e:
                            if e.code != errno.ENODEV:  # gone with its peer
                                raise
            except Exception as e:
                errors.append(f"deleting the links in {ns}: {e}")
        for ns in self._all_namespaces():
            if netns.exists(ns):
                try:
                    netns.remove(ns)
                    removed.append(ns)
                except Exception as e:
                    errors.append(f"removing namespace {ns}: {e}")
        if self._remove_state():
            removed.append(self.state_path)
        if errors:
            raise TestbedError(f"testbed {cfg.name!r} not fully removed: " + "; ".join(errors))
        return removed

    def show(self, with_offloads: bool = True) -> dict:
        """The testbed as the live system has it (missing parts are None).

        "up" is true when all three namespaces and four interfaces exist, the
        interfaces are administratively up and the hosts have their addresses.
        With `with_offloads`, each present host also reports
        "offloads": {"gro": bool, "tx_checksum": bool} (from ethtool)."""
        return testbed_inspect.show(self.config, with_offloads)

    def is_up(self) -> bool:
        return self.show(with_offloads=False)["up"]
