"""Frames for the parser fuzzer (tools/fuzz.py), built from bytes (no
packet library): a corpus of well-formed frames of every kind the parsers
tell apart, then mutations near each of their checks.

  bases      TCP/UDP over IPv4 (with options) and IPv6 (with chains of
             hop-by-hop, routing, destination options, AH and fragment
             headers); IPv4 and IPv6 fragments; GRE, ESP, SCTP, IP-in-IP,
             IPv6-in-IPv4, no-next-header; ICMP, ICMPv6, ARP, other
             ethertypes; each untagged or with one, two or three VLAN tags
  mutations  truncation, bit flips, header bytes, length fields (IPv4 total
             length and IHL, IPv6 payload length, TCP data offset, UDP
             length, extension header lengths), an extension header more, a
             VLAN tag more or less, fragment bits and headers, the protocol,
             padding; lengths re-fitted to the frame half of the time
  random     random bytes, bare or behind an IPv4/IPv6/VLAN ethertype

Every frame comes from `FrameSource(seed)`: the same seed, the same frames.
"""
from __future__ import annotations

import random
import struct

from ..formats.headers import ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6

MACS = bytes.fromhex("020000000002" "020000000001")
MAX_FRAME = 1600             # BPF_PROG_TEST_RUN takes up to a page less head- and tailroom
EXT_HEADERS = (0, 43, 44, 51, 60)
PROTOS = (6, 17, 1, 58, 47, 50, 51, 4, 41, 132, 59, 0, 44, 60, 43, 255)
ETHERTYPES = (ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, 0x0806, 0x88B5)
TAGS = (ETH_P_8021Q, ETH_P_8021AD)


def tags(*vids: int, outer: int = ETH_P_8021Q) -> bytes:
    out = b""
    for i, vid in enumerate(vids):
        out += struct.pack("!HH", outer if i == 0 else ETH_P_8021Q, vid)
    return out


def eth(ethertype: int, payload: bytes, tag: bytes = b"") -> bytes:
    return MACS + tag + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, *, options: bytes = b"", frag: int = 0, ident: int = 1) -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag, 64, proto, 0,
                       bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))) + options + payload


def ipv6(nxt: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64) + bytes(15) + b"\1" + bytes(15) + b"\2" + payload


def ext(kind: int, nxt: int, *, units: int = 0, frag: int = 0, ident: int = 7) -> bytes:
    """An IPv6 extension header: hop-by-hop/routing/destination options of
    (units+1)*8 bytes, AH of (units+2)*4, or a fragment header (offset<<3|M)."""
    if kind == 44:
        return struct.pack("!BBHI", nxt, 0, frag, ident)
    size = (units + 2) * 4 if kind == 51 else (units + 1) * 8
    return bytes((nxt, units)) + bytes(size - 2)


def tcp(sport: int = 40000, dport: int = 80, flags: int = 2, options: bytes = b"") -> bytes:
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 65535, 0, 0) + options


def udp(sport: int = 5000, dport: int = 53, data: bytes = b"q") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def _chain(kinds: list[int], final: int, body: bytes) -> tuple[int, bytes]:
    """IPv6 extension headers of `kinds` in order before `final` + `body`."""
    out, nxts = b"", kinds[1:] + [final]
    for kind, nxt in zip(kinds, nxts):
        out += ext(kind, nxt, units=1 if kind in (51, 60) else 0)  # a fragment header here is atomic
    return (kinds[0] if kinds else final), out + body


def base_frames() -> list[bytes]:
    """Well-formed frames of every kind, untagged; tags come as a mutation."""
    seg, dgram = tcp(options=b"\x02\x04\x05\xb4" * 3), udp(data=b"x" * 20)
    out = [eth(ETH_P_IP, ipv4(6, seg)), eth(ETH_P_IP, ipv4(17, dgram)),
           eth(ETH_P_IP, ipv4(6, tcp(), options=b"\x94\x04\x00\x00")),
           eth(ETH_P_IPV6, ipv6(6, tcp())), eth(ETH_P_IPV6, ipv6(17, dgram)),
           # fragments: first (with ports), middle, last; of TCP, UDP, GRE
           eth(ETH_P_IP, ipv4(6, seg[:16], frag=0x2000)), eth(ETH_P_IP, ipv4(6, seg[16:24], frag=0x2002)),
           eth(ETH_P_IP, ipv4(17, dgram[8:], frag=1)), eth(ETH_P_IP, ipv4(47, b"g" * 16, frag=0x2000)),
           eth(ETH_P_IPV6, ipv6(44, ext(44, 6, frag=1) + seg[:16])),
           eth(ETH_P_IPV6, ipv6(44, ext(44, 17, frag=16) + b"y" * 16)),
           eth(ETH_P_IPV6, ipv6(0, ext(0, 44) + ext(44, 60, frag=8 | 1) + b"z" * 24)),
           # other IP protocols, ICMP, ARP, other ethertypes
           eth(ETH_P_IP, ipv4(47, b"\0\0\x08\0" + b"g" * 20)), eth(ETH_P_IP, ipv4(50, b"e" * 24)),
           eth(ETH_P_IP, ipv4(132, b"s" * 28)), eth(ETH_P_IP, ipv4(4, ipv4(6, tcp()))),
           eth(ETH_P_IP, ipv4(41, ipv6(17, dgram))), eth(ETH_P_IPV6, ipv6(47, b"\0\0\x86\xdd" + b"g" * 8)),
           eth(ETH_P_IPV6, ipv6(59, b"")), eth(ETH_P_IPV6, ipv6(50, b"e" * 16)),
           eth(ETH_P_IP, ipv4(1, b"\x08\0\0\0\0\0\0\0")), eth(ETH_P_IPV6, ipv6(58, b"\x80\0\0\0\0\0\0\0")),
           eth(0x0806, bytes(28)), eth(0x88B5, bytes(46))]
    # IPv6 extension chains of every kind and length, up to one past the parsers' walk
    for kinds in ([0], [43], [60], [51], [44], [0, 60], [0, 43, 60], [0, 43, 51, 60], [60] * 6, [60] * 7,
                  [0, 43, 44, 60]):
        for final, body in ((6, tcp()), (17, dgram), (50, b"e" * 8), (58, b"\x80" + bytes(7))):
            nxt, payload = _chain(kinds, final, body)
            out.append(eth(ETH_P_IPV6, ipv6(nxt, payload)))
    return out


def _l3(f) -> int:
    """Where the IP header would start: past up to two VLAN tags."""
    off = 12
    for _ in range(2):
        if len(f) >= off + 4 and struct.unpack_from("!H", f, off)[0] in TAGS:
            off += 4
    return off + 2


def _fit(f: bytearray) -> None:
    """Make the IP length fields match the frame again, so the checks behind
    them are reached."""
    l3 = _l3(f)
    et = f[l3 - 2:l3]
    if et == b"\x08\x00" and len(f) >= l3 + 4:
        f[l3 + 2:l3 + 4] = min(0xFFFF, len(f) - l3).to_bytes(2, "big")
    elif et == b"\x86\xdd" and len(f) >= l3 + 6:
        f[l3 + 4:l3 + 6] = min(0xFFFF, max(0, len(f) - l3 - 40)).to_bytes(2, "big")


class FrameSource:
    """Random and mutated frames, `next()` gives (how it was made, frame)."""

    def __init__(self, seed: int = 1):
        self.rnd = random.Random(seed)
        self.bases = base_frames()
        self.mutations = {"truncate": self._truncate, "bitflip": self._bitflip, "byte": self._byte,
                          "length": self._length, "ext": self._ext, "tag": self._tag, "frag": self._frag,
                          "proto": self._proto, "pad": self._pad}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, bytes]:
        rnd = self.rnd
        if rnd.random() < 0.08:
            body = rnd.randbytes(rnd.randrange(0, 160))
            if rnd.randrange(3):
                body = MACS + struct.pack("!H", rnd.choice(ETHERTYPES)) + body
            return "random", body
        f = bytearray(rnd.choice(self.bases))
        names = rnd.sample(sorted(self.mutations), rnd.choice((0, 1, 1, 1, 2, 2, 3)))
        if rnd.randrange(3) == 0:  # tagged bases: a quarter of what follows
            names.insert(0, "tag")
        for name in names:
            self.mutations[name](f)
        if rnd.randrange(2):
            _fit(f)
        return "+".join(names) or "base", bytes(f[:MAX_FRAME])

    # --- mutations: each changes the frame in place, near one of the parsers' checks
    def _truncate(self, f: bytearray) -> None:
        rnd, n = self.rnd, len(f)
        del f[rnd.randrange(0, n + 1) if n < 12 or rnd.randrange(2) else rnd.randrange(12, min(n, 80) + 1):]

    def _bitflip(self, f: bytearray) -> None:
        for _ in range(self.rnd.randrange(1, 5)):
            i = self.rnd.randrange(12, max(13, min(len(f), 120)))
            if i < len(f):
                f[i] ^= 1 << self.rnd.randrange(8)

    def _byte(self, f: bytearray) -> None:
        i = self.rnd.randrange(12, max(13, min(len(f), 120)))
        if i < len(f):
            f[i] = self.rnd.choice((0, 0xFF, 0x80, 0x0F, 0xF0, self.rnd.randrange(256)))

    def _length(self, f: bytearray) -> None:
        rnd, l3 = self.rnd, _l3(f)
        et = f[l3 - 2:l3]
        delta = rnd.choice((0, 1, -1, 8, -8, 40, -20, rnd.randrange(-300, 300)))
        if et == b"\x08\x00" and len(f) >= l3 + 20:
            which = rnd.randrange(4)
            if which == 0:  # IHL
                f[l3] = (f[l3] & 0xF0) | rnd.choice((0, 4, 5, 6, 15, rnd.randrange(16)))
            elif which == 1:  # total length
                f[l3 + 2:l3 + 4] = max(0, min(0xFFFF, len(f) - l3 + delta)).to_bytes(2, "big")
            else:
                self._l4_length(f, l3 + (f[l3] & 0x0F) * 4, f[l3 + 9])
        elif et == b"\x86\xdd" and len(f) >= l3 + 40:
            if rnd.randrange(2):
                f[l3 + 4:l3 + 6] = max(0, min(0xFFFF, len(f) - l3 - 40 + delta)).to_bytes(2, "big")
            elif f[l3 + 6] in EXT_HEADERS and len(f) >= l3 + 42:  # the first extension header's length
                f[l3 + 41] = rnd.choice((0, 1, 2, 0xFF, rnd.randrange(256)))
            else:
                self._l4_length(f, l3 + 40, f[l3 + 6])

    def _l4_length(self, f: bytearray, l4: int, proto: int) -> None:
        if proto == 6 and len(f) > l4 + 12:
            f[l4 + 12] = self.rnd.choice((0, 4, 5, 6, 15, self.rnd.randrange(16))) << 4
        elif proto == 17 and len(f) >= l4 + 6:
            f[l4 + 4:l4 + 6] = self.rnd.choice((0, 7, 8, 9, 0xFFFF, len(f) - l4)).to_bytes(2, "big", signed=False)

    def _ext(self, f: bytearray) -> None:
        """One IPv6 extension header more, right behind the fixed header."""
        l3 = _l3(f)
        if f[l3 - 2:l3] != b"\x86\xdd" or len(f) < l3 + 40:
            return
        kind = self.rnd.choice(EXT_HEADERS)
        hdr = ext(kind, f[l3 + 6], units=self.rnd.choice((0, 0, 1, 3)),
                  frag=self.rnd.choice((0, 1, 8, 9, self.rnd.randrange(1 << 16))))
        f[l3 + 40:l3 + 40] = hdr
        f[l3 + 6] = kind

    def _tag(self, f: bytearray) -> None:
        """A VLAN tag more (802.1Q or 802.1ad; VID 0, edge or random; priority
        bits), or one less, or its TPID changed."""
        rnd = self.rnd
        how = rnd.randrange(6)
        tpid = struct.unpack_from("!H", f, 12)[0] if len(f) >= 14 else 0
        if how == 0 and tpid in TAGS:
            del f[12:16]
        elif how == 1 and tpid in TAGS:
            f[12:14] = struct.pack("!H", rnd.choice((ETH_P_8021Q, ETH_P_8021AD, ETH_P_IP, ETH_P_IPV6)))
        else:
            tci = rnd.choice((0, 1, 100, 4095, rnd.randrange(1 << 16))) | rnd.choice((0, 0, 0x2000, 0xE000))
            f[12:12] = struct.pack("!HH", rnd.choice((ETH_P_8021Q, ETH_P_8021Q, ETH_P_8021AD)), tci)

    def _frag(self, f: bytearray) -> None:
        rnd, l3 = self.rnd, _l3(f)
        et = f[l3 - 2:l3]
        if et == b"\x08\x00" and len(f) >= l3 + 8:
            f[l3 + 6:l3 + 8] = rnd.choice((0x2000, 0x0001, 0x2001, 0x1FFF, 0x4000, rnd.randrange(1 << 16))
                                          ).to_bytes(2, "big")
        elif et == b"\x86\xdd" and len(f) >= l3 + 40:
            hdr = ext(44, f[l3 + 6], frag=rnd.choice((1, 8, 9, 0, 0xFFF9, rnd.randrange(1 << 16))))
            f[l3 + 40:l3 + 40] = hdr
            f[l3 + 6] = 44

    def _proto(self, f: bytearray) -> None:
        l3 = _l3(f)
        et = f[l3 - 2:l3]
        if et == b"\x08\x00" and len(f) >= l3 + 10:
            f[l3 + 9] = self.rnd.choice(PROTOS)
        elif et == b"\x86\xdd" and len(f) >= l3 + 7:
            f[l3 + 6] = self.rnd.choice(PROTOS)

    def _pad(self, f: bytearray) -> None:
        f += self.rnd.randbytes(self.rnd.choice((1, 4, 18, 60)))
