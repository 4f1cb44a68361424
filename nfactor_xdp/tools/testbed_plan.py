"""The address plan of a testbed: its name, the names derived from it, the
interface names, MAC and IP addresses, and their validation.  Pure logic: no
namespace is touched here (tools/testbed.py builds what this describes)."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ..errors import NFactorError

IFNAMSIZ = 16  # the kernel's limit, NUL included: names have at most 15 bytes
# The longest name derived from a testbed's name is f"{name}-node" (the
# fabric's f"{name}-fab" and f"{name}-h8" are shorter); keeping it within an
# interface name's limit lets other modules reuse derived names for
# interfaces, comm names and the like.
MAX_NAME_LEN = IFNAMSIZ - 1 - len("-node")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # used with fullmatch
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

ROLES = ("src", "dst", "node")
HOSTS = ("src", "dst")
PORTS = ("ext0", "ext1")  # keys of show()["node"]["ports"]; ext0 faces src

# The fabric (TestbedConfig.hosts > 0): worker hosts NAME-h1..NAME-hN and the
# node (host 0) on one Linux bridge in namespace NAME-fab.  Fixed addresses:
# host i has 10.78.0.{1+i}/24 and MAC 02:78:00:00:00:{1+i:02x} on its fab0,
# whose peer is bridge port p{i}.
MAX_HOSTS = 7  # worker hosts: a node has at most NFX_MAX_HOSTS hosts, the ingress one of them
FABRIC_ROLE = "fab"  # key of namespaces / netns_name() for the fabric's namespace
FABRIC_BRIDGE = "br0"
FABRIC_IFNAME = "fab0"  # each host's interface on the fabric (the node's too)
FABRIC_MTU = 1600
FABRIC_IPV4_NET = "10.78.0.0"
FABRIC_IPV4_PREFIXLEN = 24
FABRIC_MAC_PREFIX = "02:78:00:00:00"  # + host 1+i
FABRIC_PORT_MAC_PREFIX = "02:78:00:00:01"  # + i: bridge port p{i}


class TestbedError(NFactorError):
    """The testbed could not be built, inspected or removed."""

    __test__ = False  # not a pytest test class despite the name


class TestbedExists(TestbedError):
    """Some namespace of the testbed already exists."""


class TestbedConfigError(TestbedError, ValueError):
    """A testbed name, interface name or address plan that cannot work."""

    __test__ = False  # not a pytest test class despite the name


def validate_name(name: Any) -> str:
    """Check a testbed name; return it or raise TestbedConfigError (a ValueError)."""
    if not isinstance(name, str):
        raise TestbedConfigError(f"testbed name must be a string, not {type(name).__name__}")
    if not name:
        raise TestbedConfigError("testbed name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise TestbedConfigError(
            f"testbed name {name!r} is too long ({len(name)} > {MAX_NAME_LEN} "
            f"characters): {name + '-node'!r} must stay within {IFNAMSIZ - 1} characters"
        )
    if not _NAME_RE.fullmatch(name):
        raise TestbedConfigError(
            f"testbed name {name!r} is invalid: use letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def validate_ifname(ifname: Any, what: str = "interface name") -> str:
    """The kernel's rules for a network device name (dev_valid_name)."""
    if not isinstance(ifname, str) or not ifname:
        raise TestbedConfigError(f"{what} must be a non-empty string, not {ifname!r}")
    if len(ifname.encode()) > IFNAMSIZ - 1:
        raise TestbedConfigError(f"{what} {ifname!r} is longer than {IFNAMSIZ - 1} bytes")
    if ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
        raise TestbedConfigError(f"{what} {ifname!r} is invalid (no '/', ':', spaces, '.' or '..')")
    return ifname


def _check_mac(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.lower()):
        raise TestbedConfigError(f"{what} {value!r} is not a MAC address like 02:77:00:00:00:01")
    mac = value.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise TestbedConfigError(f"{what} {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise TestbedConfigError(f"{what} must not be all zeros")
    return mac


def _check_host_pair(version: int, src: Any, dst: Any, prefixlen: Any) -> tuple[str, str]:
    kind = f"IPv{version}"
    bits = 32 if version == 4 else 128
    if isinstance(prefixlen, bool) or not isinstance(prefixlen, int) or not 1 <= prefixlen <= bits:
        raise TestbedConfigError(f"{kind} prefix length must be an integer in 1..{bits}, not {prefixlen!r}")
    addrs = []
    for role, value in (("src", src), ("dst", dst)):
        if not isinstance(value, str):
            raise TestbedConfigError(f"{role} {kind} address must be a string, not {value!r}")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise TestbedConfigError(f"{role} {kind} address {value!r} is not an IP address") from None
        if addr.version != version:
            raise TestbedConfigError(f"{role} {kind} address {value!r} is not an {kind} address")
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
            raise TestbedConfigError(f"{role} {kind} address {value} is not a usable unicast address")
        addrs.append(addr)
    if addrs[0] == addrs[1]:
        raise TestbedConfigError(f"src and dst {kind} addresses are the same ({addrs[0]})")
    net = ipaddress.ip_network(f"{addrs[0]}/{prefixlen}", strict=False)
    if addrs[1] not in net:
        raise TestbedConfigError(f"src and dst {kind} addresses {addrs[0]} and {addrs[1]} are not in one /{prefixlen}")
    if version == 4 and prefixlen < 31:
        for role, addr in zip(("src", "dst"), addrs):
            if addr in (net.network_address, net.broadcast_address):
                raise TestbedConfigError(f"{role} IPv4 address {addr} is the network or broadcast address of {net}")
    return str(addrs[0]), str(addrs[1])


def validate_hosts(hosts: Any) -> int:
    """Check a number of worker hosts (0..MAX_HOSTS); return it or raise TestbedConfigError."""
    if isinstance(hosts, bool) or not isinstance(hosts, int):
        raise TestbedConfigError(f"hosts must be an integer in 0..{MAX_HOSTS}, not {hosts!r}")
    if not 0 <= hosts <= MAX_HOSTS:
        raise TestbedConfigError(f"hosts must be in 0..{MAX_HOSTS} (worker hosts on the fabric), not {hosts}")
    return hosts


@dataclass(frozen=True)
class TestbedConfig:
    """The address plan of a testbed; the defaults are the built-in testbed."""

    __test__ = False  # not a pytest test class despite the name

    name: str = "nfx"
    host_ifname: str = "eth0"  # each host's interface
    port0_ifname: str = "ext0"  # node port facing src
    port1_ifname: str = "ext1"  # node port facing dst
    src_mac: str = "02:77:00:00:00:01"
    dst_mac: str = "02:77:00:00:00:02"
    port0_mac: str = "02:77:00:00:01:00"
    port1_mac: str = "02:77:00:00:01:01"
    src_ipv4: str = "10.77.0.1"
    dst_ipv4: str = "10.77.0.2"
    ipv4_prefixlen: int = 24
    src_ipv6: str = "fd77::1"
    dst_ipv6: str = "fd77::2"
    ipv6_prefixlen: int = 64
    hosts: int = 0  # worker hosts NAME-h1..NAME-hN on a fabric with the node (0: no fabric)

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_hosts(self.hosts)
        validate_ifname(self.host_ifname, "host interface name")
        validate_ifname(self.port0_ifname, "node port 0 name")
        validate_ifname(self.port1_ifname, "node port 1 name")
        if self.port0_ifname == self.port1_ifname:
            raise TestbedConfigError(f"node ports must have different names (both {self.port0_ifname!r})")
        macs = {}
        for field in ("src_mac", "dst_mac", "port0_mac", "port1_mac"):
            mac = _check_mac(getattr(self, field), field)
            if mac in macs:
                raise TestbedConfigError(f"{field} {mac} is the same as {macs[mac]}")
            macs[mac] = field
            object.__setattr__(self, field, mac)
        for entry in self.fabric_hosts():
            if entry["mac"] in macs or entry["port_mac"] in macs:
                clash = entry["mac"] if entry["mac"] in macs else entry["port_mac"]
                raise TestbedConfigError(f"{macs[clash]} {clash} is a MAC address of the fabric (host {entry['host']})")
        v4 = _check_host_pair(4, self.src_ipv4, self.dst_ipv4, self.ipv4_prefixlen)
        v6 = _check_host_pair(6, self.src_ipv6, self.dst_ipv6, self.ipv6_prefixlen)
        # store the canonical text (e.g. "fd77:0::1" -> "fd77::1")
        object.__setattr__(self, "src_ipv4", v4[0])
        object.__setattr__(self, "dst_ipv4", v4[1])
        object.__setattr__(self, "src_ipv6", v6[0])
        object.__setattr__(self, "dst_ipv6", v6[1])

    # derived names -------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        """The namespaces' roles: ROLES, then "fab" and "h1".."hN" with hosts."""
        if not self.hosts:
            return ROLES
        return (*ROLES, FABRIC_ROLE, *(f"h{i}" for i in range(1, self.hosts + 1)))

    def netns_name(self, role: str) -> str:
        if role not in self.roles:
            raise TestbedConfigError(f"unknown role {role!r} (one of {', '.join(self.roles)})")
        return f"{self.name}-{role}"

    @property
    def namespaces(self) -> dict[str, str]:
        """role -> namespace, for every namespace of the testbed (with hosts,
        the fabric's "fab" and the workers' "h1".."hN" too)."""
        return {role: self.netns_name(role) for role in self.roles}

    # the fabric ----------------------------------------------------------------
    @property
    def fabric_netns(self) -> str:
        """The fabric's namespace, NAME-fab (it exists only when hosts > 0)."""
        return f"{self.name}-{FABRIC_ROLE}"

    def host_netns(self, host: int) -> str:
        """The namespace of fabric host `host`: 0 is the node (NAME-node), i the worker NAME-hi."""
        self._check_fabric_host(host)
        return self.netns_name("node") if host == 0 else f"{self.name}-h{host}"

    def _check_fabric_host(self, host: Any) -> None:
        if not self.hosts:
            raise TestbedConfigError(f"testbed {self.name!r} has no fabric (hosts=0)")
        if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host <= self.hosts:
            raise TestbedConfigError(f"fabric host must be 0 (the node) .. {self.hosts}, not {host!r}")

    def fabric_host(self, host: int) -> dict[str, Any]:
        """The planned fabric settings of host `host` (0: the node, 1..hosts: workers)."""
        self._check_fabric_host(host)
        net = ipaddress.ip_network(f"{FABRIC_IPV4_NET}/{FABRIC_IPV4_PREFIXLEN}")
        return {
            "host": host,
            "netns": self.host_netns(host),
            "ifname": FABRIC_IFNAME,
            "ipv4": str(net.network_address + 1 + host),
            "prefixlen": FABRIC_IPV4_PREFIXLEN,
            "mac": f"{FABRIC_MAC_PREFIX}:{1 + host:02x}",
            "port": f"p{host}",  # its bridge port in the fabric's namespace
            "port_mac": f"{FABRIC_PORT_MAC_PREFIX}:{host:02x}",
        }

    def fabric_hosts(self) -> list[dict[str, Any]]:
        """The planned fabric: one entry per host, the node (host 0) first,
        then workers 1..hosts; [] without a fabric.  Each entry has "host",
        "netns", "ifname" (fab0), "ipv4" (no prefix), "prefixlen", "mac",
        and "port"/"port_mac" (its bridge port in the fabric namespace)."""
        return [self.fabric_host(i) for i in range(self.hosts + 1)] if self.hosts else []

    def fabric(self) -> dict[str, Any] | None:
        """The planned fabric as show()["fabric"] has it; None when hosts == 0."""
        if not self.hosts:
            return None
        return {"netns": self.fabric_netns, "bridge": FABRIC_BRIDGE, "mtu": FABRIC_MTU,
                "hosts": self.fabric_hosts()}

    def host(self, role: str) -> dict[str, Any]:
        """The planned settings of host `role` ("src" or "dst")."""
        if role not in HOSTS:
            raise TestbedConfigError(f"unknown host {role!r} (src or dst)")
        peer = "dst" if role == "src" else "src"
        return {
            "netns": self.netns_name(role),
            "ifname": self.host_ifname,
            "mac": getattr(self, f"{role}_mac"),
            "ipv4": getattr(self, f"{role}_ipv4"),
            "ipv6": getattr(self, f"{role}_ipv6"),
            "peer_mac": getattr(self, f"{peer}_mac"),
            "peer_ipv4": getattr(self, f"{peer}_ipv4"),
            "peer_ipv6": getattr(self, f"{peer}_ipv6"),
            "port": self.port0_ifname if role == "src" else self.port1_ifname,
            "port_mac": self.port0_mac if role == "src" else self.port1_mac,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TestbedConfig":
        if not isinstance(data, dict):
            raise TestbedConfigError(f"testbed config must be a mapping, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TestbedConfigError(f"unknown testbed config field(s): {', '.join(unknown)}")
        return cls(**data)  # a missing field (e.g. "hosts" of an older state file) takes its default
