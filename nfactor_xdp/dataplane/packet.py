"""Frame parsing in the runtime: the same classification as the switch
(bpf/nfactor_parse.h), yielding the same canonical flow key
(formats/flowkey.py, struct nfx_flow_key), so a runtime's flows and the
switch's table name a flow by identical bytes.
"""
from __future__ import annotations

from ..formats.flowkey import HI_TO_LO, LO_TO_HI, V4_MAPPED, canonical
from ..formats.headers import (ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
                               IPPROTO_UDP, IPV4_HLEN, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, V4_DST,
                               V4_FRAG, V4_L4, V4_PROTO, V4_SRC, V4_TOT_LEN, V6_DST, V6_L4, V6_NEXT,
                               V6_PAYLOAD_LEN, V6_SRC)
from ..kern import layouts as L

FLOW = 0   # a TCP/UDP flow: key and direction
OTHER = 1  # not a flow (ARP, ICMP, non-IP, VLAN, other IP protocols)
DROP = 2   # malformed

TCP, UDP, ICMP, ICMPV6 = IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6
_IPV6_EXT = {0, 43, 44, 51, 60}       # hop-by-hop, routing, fragment, AH, destination options
IPV6_FRAGMENT, IPV6_AH = 44, 51
MAX_IPV6_EXT = L.C["NFX_MAX_IPV6_EXT"]
_NO_PORTS = b"\0\0"

__all__ = ["FLOW", "OTHER", "DROP", "TCP", "UDP", "LO_TO_HI", "HI_TO_LO", "ORIG", "REPLY", "classify", "Packet",
           "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK", "V4_L4", "V4_SRC"]


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
    if end < ETH_HLEN:
        return DROP, None, 0, -1
    et = (frame[12] << 8) | frame[13]
    if et == ETH_P_IP:
        if end < V4_L4:
            return DROP, None, 0, -1
        vihl = frame[ETH_HLEN]
        ihl = (vihl & 0x0F) * 4
        tot = (frame[V4_TOT_LEN] << 8) | frame[V4_TOT_LEN + 1]
        if vihl >> 4 != 4 or ihl < IPV4_HLEN or ETH_HLEN + ihl > end or tot < ihl or ETH_HLEN + tot > end:
            return DROP, None, 0, -1
        proto = frame[V4_PROTO]
        if proto != TCP and proto != UDP:
            return OTHER, None, 0, -1
        addrs = bytes(frame[V4_SRC:V4_DST + 4])
        src, dst = V4_MAPPED + addrs[:4], V4_MAPPED + addrs[4:]
        if (frame[V4_FRAG] & 0x3F) or frame[V4_FRAG + 1]:  # MF or offset: a fragment
            key, d = canonical(src, _NO_PORTS, dst, _NO_PORTS, proto)
            return FLOW, key, d, -1
        l4 = ETH_HLEN + ihl
        ports = _ports(frame, l4, end, proto)
        if ports is None:
            return DROP, None, 0, -1
        key, d = canonical(src, ports[:2], dst, ports[2:], proto)
        return FLOW, key, d, l4
    if et == ETH_P_IPV6:
        if end < V6_L4 or frame[ETH_HLEN] >> 4 != 6 or \
                V6_L4 + ((frame[V6_PAYLOAD_LEN] << 8) | frame[V6_PAYLOAD_LEN + 1]) > end:
            return DROP, None, 0, -1
        nxt, off, fragment = frame[V6_NEXT], V6_L4, False
        for _ in range(MAX_IPV6_EXT):
            if nxt not in _IPV6_EXT:
                break
            if off + 8 > end:
                return DROP, None, 0, -1
            if nxt == IPV6_FRAGMENT:
                fragment = fragment or bool(((frame[off + 2] << 8) | frame[off + 3]) & 0xFFF9)
                step = 8
            elif nxt == IPV6_AH:
                step = (frame[off + 1] + 2) * 4
            else:
                step = (frame[off + 1] + 1) * 8
            nxt, off = frame[off], off + step
        if nxt != TCP and nxt != UDP:
            return (DROP if nxt in _IPV6_EXT else OTHER), None, 0, -1
        if off > end:
            return DROP, None, 0, -1
        src, dst = bytes(frame[V6_SRC:V6_DST]), bytes(frame[V6_DST:V6_L4])
        if fragment:
            key, d = canonical(src, _NO_PORTS, dst, _NO_PORTS, nxt)
            return FLOW, key, d, -1
        ports = _ports(frame, off, end, nxt)
        if ports is None:
            return DROP, None, 0, -1
        key, d = canonical(src, ports[:2], dst, ports[2:], nxt)
        return FLOW, key, d, off
    return OTHER, None, 0, -1


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
        return self.frame[ETH_HLEN] >> 4

    @property
    def src(self) -> str:
        return self._addr(V4_SRC, V6_SRC)

    @property
    def dst(self) -> str:
        return self._addr(V4_DST, V6_DST)

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
            return min(len(f), ETH_HLEN + ((f[V4_TOT_LEN] << 8) | f[V4_TOT_LEN + 1]))
        return min(len(f), V6_L4 + ((f[V6_PAYLOAD_LEN] << 8) | f[V6_PAYLOAD_LEN + 1]))

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

