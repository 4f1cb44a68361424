"""The canonical flow key (struct nfx_flow_key in bpf/nfactor_shared.h): the
one name of a flow shared by the switch's table, the runtimes' actors, the
control messages and the CLI.

The endpoint (address, port) that compares lower as big-endian bytes goes
first, so both directions of a connection have the same key; IPv4 addresses
are stored IPv4-mapped; ports in network order.  `canonical` builds it (the
runtime's parser calls it per new frame), `FlowKey` reads it back, `parse`
takes what an operator types.
"""
from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from ..errors import NFactorError
from ..kern import layouts as L
from .headers import IPPROTO_TCP, IPPROTO_UDP

KEY_SIZE = ctypes.sizeof(L.FlowKeyStruct)
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_PAD = {p: bytes([p, 0, 0, 0]) for p in PROTO_NAMES}  # proto and the struct's 3 pad bytes

class FlowKeyError(NFactorError, ValueError):
    """A flow given in a form that names no flow."""


# Direction of a frame relative to its canonical key (not to the flow's first frame).
LO_TO_HI, HI_TO_LO = 0, 1


def canonical(src: bytes, sport: bytes, dst: bytes, dport: bytes, proto: int) -> tuple[bytes, int]:
    """(key, direction) of a frame from src:sport to dst:dport (16-byte
    addresses, 2-byte ports, all network order)."""
    if src + sport > dst + dport:  # as bytes == as big-endian numbers
        return dst + src + dport + sport + _PAD[proto], HI_TO_LO
    return src + dst + sport + dport + _PAD[proto], LO_TO_HI


def _packed(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return V4_MAPPED + ip.packed if ip.version == 4 else ip.packed


def _text(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class FlowKey:
    """A canonical key, decoded."""
    lo_addr: str
    lo_port: int
    hi_addr: str
    hi_port: int
    proto: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> "FlowKey":
        if len(raw) != KEY_SIZE:
            raise ValueError(f"a flow key has {KEY_SIZE} bytes, not {len(raw)}")
        return cls(_text(raw[0:16]), int.from_bytes(raw[32:34], "big"), _text(raw[16:32]),
                   int.from_bytes(raw[34:36], "big"), raw[36])

    def __str__(self) -> str:
        p = PROTO_NAMES.get(self.proto, str(self.proto))
        return f"{p} {_endpoint(self.lo_addr, self.lo_port)} <-> {_endpoint(self.hi_addr, self.hi_port)}"


def key_of(proto: str, src: str, sport: int, dst: str, dport: int) -> bytes:
    """The canonical key of a flow given as a 5-tuple (either direction)."""
    p = {name: num for num, name in PROTO_NAMES.items()}[proto.lower()]
    return canonical(_packed(src), sport.to_bytes(2, "big"), _packed(dst), dport.to_bytes(2, "big"), p)[0]


def parse(text: str) -> bytes:
    """'udp 10.0.0.1:5000 10.0.0.2:53' (or '[fd00::1]:5000', either order,
    '<->' allowed), or a key in hex -> the key."""
    t = text.strip()
    if len(t) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in t):
        return bytes.fromhex(t)
    try:
        proto, a, b = t.replace("<->", " ").split()
        (ha, pa), (hb, pb) = (x.rsplit(":", 1) for x in (a, b))
        return key_of(proto, ha.strip("[]"), int(pa), hb.strip("[]"), int(pb))
    except (ValueError, KeyError):
        raise FlowKeyError(f"flow {text!r}: give 'tcp|udp SRC:PORT DST:PORT' or a key in hex") from None


def describe(key: bytes) -> str:
    """'tcp 10.0.0.1:5000 <-> 10.0.0.2:80' for a key."""
    return str(FlowKey.from_bytes(key))
