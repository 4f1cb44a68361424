"""The canonical flow key (struct nfx_flow_key in bpf/nfactor_shared.h): the
one name of a flow shared by the switch's table, the runtimes' actors, the
control messages and the CLI.

The endpoint (address, port) that compares lower as big-endian bytes goes
first, so both directions of a connection have the same key; IPv4 addresses
are stored IPv4-mapped; ports in network order.  Fragments and protocols
without ports have ports 0.  The VLAN ids (outer, inner; 0 when absent) follow
the protocol.  `canonical` builds it (the runtime's parser calls it per new
frame), `FlowKey` reads it back, `parse` takes what an operator types:

    tcp 10.0.0.1:5000 <-> 10.0.0.2:80
    udp [fd00::1]:5 <-> [fd00::2]:9 vlan 100.200
    gre 10.0.0.1 <-> 10.0.0.2 vlan 7
"""
from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from ..errors import NFactorError
from ..kern import layouts as L
from .headers import IP_PROTOS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

KEY_SIZE = ctypes.sizeof(L.FlowKeyStruct)
PROTO_NAMES = {num: name for name, num in IP_PROTOS.items()}
PORTED = (IPPROTO_TCP, IPPROTO_UDP)   # the protocols whose flows have ports
NOT_FLOWS = (IPPROTO_ICMP, IPPROTO_ICMPV6)  # other traffic for the switch, never a key's protocol
V4_MAPPED = b"\0" * 10 + b"\xff\xff"
NO_VLAN = b"\0\0\0\0"
_PAD = [bytes([p, 0, 0, 0]) for p in range(256)]  # proto and the struct's 3 pad bytes
_PROTO_AT, _VLAN_AT = L.FlowKeyStruct.proto.offset, L.FlowKeyStruct.vlan_outer.offset
# key[36] (protocol) and key[40:44] (VLANs) are read at these offsets by the actor, marker and runtime
assert (_PROTO_AT, _VLAN_AT, KEY_SIZE) == (36, 40, 44), "struct nfx_flow_key moved: update its readers"

class FlowKeyError(NFactorError, ValueError):
    """A flow given in a form that names no flow."""


# Direction of a frame relative to its canonical key (not to the flow's first frame).
LO_TO_HI, HI_TO_LO = 0, 1


def canonical(src: bytes, sport: bytes, dst: bytes, dport: bytes, proto: int,
              vlans: bytes = NO_VLAN) -> tuple[bytes, int]:
    """(key, direction) of a frame from src:sport to dst:dport (16-byte
    addresses, 2-byte ports, all network order) on VLANs `vlans` (outer and
    inner VID, 2 bytes each, network order)."""
    if src + sport > dst + dport:  # as bytes == as big-endian numbers
        return dst + src + dport + sport + _PAD[proto] + vlans, HI_TO_LO
    return src + dst + sport + dport + _PAD[proto] + vlans, LO_TO_HI


def _packed(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return V4_MAPPED + ip.packed if ip.version == 4 else ip.packed


def _text(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


def _endpoint(addr: str, port: int, proto: int) -> str:
    if proto not in PORTED:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def proto_number(name) -> int:
    """An IP protocol by name (tcp, gre, ...) or number (0-255); ValueError otherwise."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name <= 255:
        return name
    if isinstance(name, str):
        if name.lower() in IP_PROTOS:
            return IP_PROTOS[name.lower()]
        if name.isdigit() and int(name) <= 255:
            return int(name)
    raise ValueError(f"{name!r} is not an IP protocol ({', '.join(IP_PROTOS)} or 0-255)")


@dataclass(frozen=True)
class FlowKey:
    """A canonical key, decoded."""
    lo_addr: str
    lo_port: int
    hi_addr: str
    hi_port: int
    proto: int
    vlan_outer: int = 0
    vlan_inner: int = 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> "FlowKey":
        if len(raw) != KEY_SIZE:
            raise ValueError(f"a flow key has {KEY_SIZE} bytes, not {len(raw)}")
        return cls(_text(raw[0:16]), int.from_bytes(raw[32:34], "big"), _text(raw[16:32]),
                   int.from_bytes(raw[34:36], "big"), raw[_PROTO_AT],
                   int.from_bytes(raw[_VLAN_AT:_VLAN_AT + 2], "big"), int.from_bytes(raw[_VLAN_AT + 2:], "big"))

    def __str__(self) -> str:
        p = PROTO_NAMES.get(self.proto, str(self.proto))
        text = (f"{p} {_endpoint(self.lo_addr, self.lo_port, self.proto)} <-> "
                f"{_endpoint(self.hi_addr, self.hi_port, self.proto)}")
        if self.vlan_inner:
            return f"{text} vlan {self.vlan_outer}.{self.vlan_inner}"
        return f"{text} vlan {self.vlan_outer}" if self.vlan_outer else text


def vlan_bytes(outer: int = 0, inner: int = 0) -> bytes:
    if not (0 <= outer <= 0xFFF and 0 <= inner <= 0xFFF):
        raise ValueError(f"VLAN ids are 0-4095, not {outer}.{inner}")
    return outer.to_bytes(2, "big") + inner.to_bytes(2, "big")


def key_of(proto, src: str, sport: int, dst: str, dport: int, vlan: tuple[int, int] = (0, 0)) -> bytes:
    """The canonical key of a flow given as a 5-tuple (either direction)."""
    p = proto_number(proto)
    if p not in PORTED:
        sport = dport = 0
    return canonical(_packed(src), sport.to_bytes(2, "big"), _packed(dst), dport.to_bytes(2, "big"), p,
                     vlan_bytes(*vlan))[0]


def _address_port(text: str, ported: bool) -> tuple[str, int]:
    if not ported:
        return text.strip("[]"), 0
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def parse(text: str) -> bytes:
    """'udp 10.0.0.1:5000 10.0.0.2:53' (or '[fd00::1]:5000', either order,
    '<->' allowed, 'vlan N' or 'vlan OUTER.INNER' after), 'gre 10.0.0.1
    10.0.0.2' (protocols without ports), or a key in hex -> the key."""
    t = text.strip()
    if len(t) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in t):
        return bytes.fromhex(t)
    try:
        words = t.replace("<->", " ").split()
        vlan = (0, 0)
        if len(words) == 5 and words[3] == "vlan":
            outer, _, inner = words.pop().partition(".")
            vlan = (int(outer), int(inner or 0))
            words.pop()
        proto, a, b = words
        p = proto_number(proto)
        if p in NOT_FLOWS:
            raise ValueError("ICMP is not a flow")
        (ha, pa), (hb, pb) = (_address_port(x, p in PORTED) for x in (a, b))
        return key_of(p, ha, pa, hb, pb, vlan)
    except (ValueError, KeyError):
        raise FlowKeyError(f"flow {text!r}: give 'tcp|udp SRC:PORT DST:PORT [vlan N[.M]]', "
                           "'PROTO SRC DST [vlan N[.M]]' or a key in hex") from None


def describe(key: bytes) -> str:
    """'tcp 10.0.0.1:5000 <-> 10.0.0.2:80' (then ' vlan 100' when tagged) for a key."""
    return str(FlowKey.from_bytes(key))
