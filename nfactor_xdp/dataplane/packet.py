"""Frame parsing in the runtime: the same classification as the switch
(bpf/nfactor_parse.h), yielding the same 40-byte canonical flow key
(struct nfx_flow_key), so a runtime's flows and the switch's table name a
flow by identical bytes.
"""
from __future__ import annotations

import struct

FLOW = 0   # a TCP/UDP flow: key and direction
OTHER = 1  # not a flow (ARP, ICMP, non-IP, VLAN, other IP protocols)
DROP = 2   # malformed

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"
_PAD = {TCP: b"\x06\0\0\0", UDP: b"\x11\0\0\0"}
_IPV6_EXT = {0, 43, 44, 51, 60}
MAX_IPV6_EXT = 6

# direction of a frame relative to its canonical key
LO_TO_HI, HI_TO_LO = 0, 1


def _key(src: bytes, sport: bytes, dst: bytes, dport: bytes, proto: int) -> tuple[bytes, int]:
    # (addr, port) compared as big-endian numbers == compared as bytes
    if src + sport > dst + dport:
        return dst + src + dport + sport + _PAD[proto], HI_TO_LO
    return src + dst + sport + dport + _PAD[proto], LO_TO_HI


def _ports(frame, off: int, end: int, proto: int) -> bytes | None:
    if proto == TCP:
        if off + 20 > end:
            return None
        doff = frame[off + 12] >> 4
        if doff < 5 or off + doff * 4 > end:
            return None
    else:
        if off + 8 > end or ((frame[off + 4] << 8) | frame[off + 5]) < 8:
            return None
    return bytes(frame[off:off + 4])


def classify(frame) -> tuple[int, bytes | None, int, int]:
    """Returns (kind, key, direction, l4 offset).  `frame` is bytes-like.
    l4 offset is -1 when the frame has no L4 header to read (fragments)."""
    end = len(frame)
    if end < 14:
        return DROP, None, 0, -1
    et = (frame[12] << 8) | frame[13]
    if et == 0x0800:
        if end < 34:
            return DROP, None, 0, -1
        vihl = frame[14]
        ihl = (vihl & 0x0F) * 4
        tot = (frame[16] << 8) | frame[17]
        if vihl >> 4 != 4 or ihl < 20 or 14 + ihl > end or tot < ihl or 14 + tot > end:
            return DROP, None, 0, -1
        proto = frame[23]
        if proto != TCP and proto != UDP:
            return OTHER, None, 0, -1
        addrs = bytes(frame[26:34])
        src, dst = _V4_PREFIX + addrs[:4], _V4_PREFIX + addrs[4:]
        if (frame[20] & 0x3F) or frame[21]:  # MF or offset: a fragment
            key, d = _key(src, b"\0\0", dst, b"\0\0", proto)
            return FLOW, key, d, -1
        l4 = 14 + ihl
        ports = _ports(frame, l4, end, proto)
        if ports is None:
            return DROP, None, 0, -1
        key, d = _key(src, ports[:2], dst, ports[2:], proto)
        return FLOW, key, d, l4
    if et == 0x86DD:
        if end < 54 or frame[14] >> 4 != 6 or 54 + ((frame[18] << 8) | frame[19]) > end:
            return DROP, None, 0, -1
        nxt, off, fragment = frame[20], 54, False
        for _ in range(MAX_IPV6_EXT):
            if nxt not in _IPV6_EXT:
                break
            if off + 8 > end:
                return DROP, None, 0, -1
            if nxt == 44:
                fragment = fragment or bool(((frame[off + 2] << 8) | frame[off + 3]) & 0xFFF9)
                step = 8
            elif nxt == 51:
                step = (frame[off + 1] + 2) * 4
            else:
                step = (frame[off + 1] + 1) * 8
            nxt, off = frame[off], off + step
        if nxt != TCP and nxt != UDP:
            return (DROP if nxt in _IPV6_EXT else OTHER), None, 0, -1
        if off > end:
            return DROP, None, 0, -1
        src, dst = bytes(frame[22:38]), bytes(frame[38:54])
        if fragment:
            key, d = _key(src, b"\0\0", dst, b"\0\0", nxt)
            return FLOW, key, d, -1
        ports = _ports(frame, off, end, nxt)
        if ports is None:
            return DROP, None, 0, -1
        key, d = _key(src, ports[:2], dst, ports[2:], nxt)
        return FLOW, key, d, off
    return OTHER, None, 0, -1


def key_of(proto: str, src: str, sport: int, dst: str, dport: int) -> bytes:
    """The canonical key of a flow given as a 5-tuple (either direction)."""
    import ipaddress
    p = {"tcp": TCP, "udp": UDP}[proto.lower()]

    def addr(a: str) -> bytes:
        ip = ipaddress.ip_address(a)
        return _V4_PREFIX + ip.packed if ip.version == 4 else ip.packed
    return _key(addr(src), sport.to_bytes(2, "big"), addr(dst), dport.to_bytes(2, "big"), p)[0]


def parse_flow(text: str) -> bytes:
    """'udp 10.0.0.1:5000 10.0.0.2:53' (or '[fd00::1]:5000'), or a key in hex -> the key."""
    t = text.strip()
    if len(t) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in t):
        return bytes.fromhex(t)
    try:
        proto, a, b = t.replace("<->", " ").split()
        (ha, pa), (hb, pb) = (x.rsplit(":", 1) for x in (a, b))
        return key_of(proto, ha.strip("[]"), int(pa), hb.strip("[]"), int(pb))
    except (ValueError, KeyError):
        raise ValueError(f"flow {text!r}: give 'tcp|udp SRC:PORT DST:PORT' or a key in hex") from None


def describe_key(key: bytes) -> str:
    from ..kern.maps import FlowKey
    return str(FlowKey.from_bytes(key))


KEY_SIZE = 40
assert struct.calcsize("16s16sHHB3x") == KEY_SIZE


ORIG, REPLY = 0, 1


class Packet:
    """What an NF sees of a frame: parsed headers on demand, the payload as a
    view of the frame (no copy).  `frame` and `payload` are only valid during
    process_packet(); copy what must outlive it (bytes(pkt.payload)).

    direction: ORIG (0) for the direction of the flow's first packet, REPLY (1)
    for the other.
    """
    __slots__ = ("frame", "direction", "l4", "proto", "now")

    def __init__(self, frame, direction: int, l4: int, proto: int, now: float = 0.0):
        self.frame = frame
        self.direction = direction
        self.l4 = l4          # offset of the TCP/UDP header, -1 for a fragment
        self.proto = proto    # TCP (6) or UDP (17)
        self.now = now        # the runtime's clock (time.monotonic) for this batch

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def ip_version(self) -> int:
        return self.frame[14] >> 4

    @property
    def src(self) -> str:
        return self._addr(26, 22)

    @property
    def dst(self) -> str:
        return self._addr(30, 38)

    def _addr(self, v4: int, v6: int) -> str:
        import ipaddress
        f = self.frame
        if self.ip_version == 4:
            return str(ipaddress.IPv4Address(bytes(f[v4:v4 + 4])))
        return str(ipaddress.IPv6Address(bytes(f[v6:v6 + 16])))

    @property
    def sport(self) -> int:
        return (self.frame[self.l4] << 8) | self.frame[self.l4 + 1] if self.l4 >= 0 else 0

    @property
    def dport(self) -> int:
        return (self.frame[self.l4 + 2] << 8) | self.frame[self.l4 + 3] if self.l4 >= 0 else 0

    @property
    def is_tcp(self) -> bool:
        return self.proto == TCP

    @property
    def tcp_flags(self) -> int:
        return self.frame[self.l4 + 13] if self.l4 >= 0 and self.is_tcp else 0

    @property
    def seq(self) -> int:
        return int.from_bytes(self.frame[self.l4 + 4:self.l4 + 8], "big") if self.l4 >= 0 else 0

    @property
    def ack(self) -> int:
        return int.from_bytes(self.frame[self.l4 + 8:self.l4 + 12], "big") if self.l4 >= 0 else 0

    @property
    def ip_end(self) -> int:
        """End of the IP packet inside the frame (Ethernet padding excluded)."""
        f = self.frame
        if self.ip_version == 4:
            return min(len(f), 14 + ((f[16] << 8) | f[17]))
        return min(len(f), 54 + ((f[18] << 8) | f[19]))

    @property
    def payload_offset(self) -> int:
        if self.l4 < 0:
            return self.ip_end
        if self.is_tcp:
            return min(self.ip_end, self.l4 + (self.frame[self.l4 + 12] >> 4) * 4)
        return min(self.ip_end, self.l4 + 8)

    @property
    def payload(self):
        return self.frame[self.payload_offset:self.ip_end]


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
