"""The fabric between a node's hosts (docs/architecture.md, "Hosts").

A node with hosts has an ingress host (host 0: the external ports, the flow
table, the controller and the switch agent) and worker hosts (1..) that run
runtimes only.  Every host has one fabric address (IPv4).  Here:
- which runtime lives where: runtime r on host r // RUNTIMES_PER_HOST;
- the control addresses: each process binds a UDP port on its host's fabric
  address (CONTROL_PORTS, RUNTIME_PORT + r from the node's control port);
- the encapsulation as Python builds it (the switch agent's markers, tests),
  byte for byte what bpf/nfactor_fabric.h builds.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from ..kern import layouts as L

MAX_HOSTS = L.C["NFX_MAX_HOSTS"]
RUNTIMES_PER_HOST = L.C["NFX_RUNTIMES_PER_HOST"]
ENCAP_LEN = L.C["NFX_FABRIC_ENCAP_LEN"]
UDP_PORT = L.C["NFX_FABRIC_UDP_PORT"]
# offsets from the node's control port
CONTROL_PORTS = {"controller": 0, "heartbeat": 1, "switch": 2, "supervisor": 3}
RUNTIME_PORT = 16


class FabricError(ValueError):
    pass


def parse_hosts(text: str) -> list[str]:
    """'10.78.0.1,10.78.0.2' -> the hosts' fabric addresses, host 0 first."""
    if not text or not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            addr = ipaddress.IPv4Address(part.strip())
        except ValueError:
            raise FabricError(f"host address {part.strip()!r} is not an IPv4 address") from None
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
            raise FabricError(f"host address {addr} is not a usable unicast address")
        if str(addr) in out:
            raise FabricError(f"host address {addr} is listed twice")
        out.append(str(addr))
    if len(out) > MAX_HOSTS:
        raise FabricError(f"at most {MAX_HOSTS} hosts, not {len(out)}")
    return out


def worker_name(node: str, host: int) -> str:
    """A worker host's own name for its pins, run and log directories: on
    one machine (the testbed's namespaces) they must not meet the ingress's."""
    return f"{node}-h{host}"


def host_of(rt_id: int) -> int:
    return rt_id // RUNTIMES_PER_HOST


def runtime_ids(host: int, count: int) -> list[int]:
    """The ids of a host's first `count` runtimes."""
    return [host * RUNTIMES_PER_HOST + i for i in range(count)]


def control_address(hosts: list[str], port: int, role: str, host: int) -> tuple[str, int]:
    """The UDP address of `role` (controller, heartbeat, switch, supervisor,
    rtN, or anything else: a client's, any free port) on `host` (the switch
    agent's is on the ingress host, a runtime's on its own)."""
    if role.startswith("rt") and role[2:].isdigit():
        rt = int(role[2:])
        return hosts[host_of(rt)], port + RUNTIME_PORT + rt
    if role in CONTROL_PORTS:  # the switch agent lives with the switch; the others where they run
        return hosts[0 if role == "switch" else host], port + CONTROL_PORTS[role]
    return hosts[host], 0


def mac_bytes(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


def _csum(header: bytes) -> int:
    s = sum(struct.unpack("!10H", header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def encap(src: tuple[str, str], dst: tuple[str, str], runtime: int, tagged: bytes) -> bytes:
    """Outer headers for `tagged` ([ingress tag][frame]) from host `src` to
    host `dst`, each (IPv4 address, MAC)."""
    push = ENCAP_LEN - L.C["NFX_INGRESS_TAG_LEN"]
    total = push + len(tagged)
    eth = mac_bytes(dst[1]) + mac_bytes(src[1]) + struct.pack("!H", 0x0800)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total - 14, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", L.C["NFX_FABRIC_SRC_PORT"] + runtime, UDP_PORT, total - 34, 0)
    hdr = bytes([L.C["NFX_FABRIC_MAGIC"], L.C["NFX_FABRIC_VERSION"], runtime])
    return eth + ip + udp + hdr + tagged
