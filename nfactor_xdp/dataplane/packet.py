"""Frame parsing in the runtime: the same classification as the switch
(bpf/nfactor_parse.h), yielding the same canonical flow key
(formats/flowkey.py, struct nfx_flow_key), so a runtime's flows and the
switch's table name a flow by identical bytes.
"""
from __future__ import annotations

from ..formats.flowkey import HI_TO_LO, LO_TO_HI, NO_VLAN, PORTED, V4_MAPPED, canonical
from ..formats.headers import (ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP,
                               IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, TCP_ACK, TCP_FIN,
                               TCP_PSH, TCP_RST, TCP_SYN, V4_L4, V4_SRC)
from ..kern import layouts as L

FLOW = 0   # a flow: key and direction (TCP/UDP by ports; fragments and other IP protocols without)
OTHER = 1  # not a flow (ARP, ICMP, non-IP)
DROP = 2   # malformed, or more than two VLAN tags

TCP, UDP, ICMP, ICMPV6 = IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6
_IPV6_EXT = {0, 43, 44, 51, 60}       # hop-by-hop, routing, fragment, AH, destination options
IPV6_FRAGMENT, IPV6_AH = 44, 51
MAX_IPV6_EXT = L.C["NFX_MAX_IPV6_EXT"]
_NO_PORTS = b"\0\0"
_TAGS = (ETH_P_8021Q, ETH_P_8021AD)

__all__ = ["FLOW", "OTHER", "DROP", "TCP", "UDP", "LO_TO_HI", "HI_TO_LO", "ORIG", "REPLY", "classify", "Packet",
           "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK", "V4_L4", "V4_SRC", "l3_offset", "ipv6_walk"]


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


def l3_offset(frame) -> int:
    """Where the IP header starts: after the Ethernet header and up to two
    VLAN tags (the caller knows the frame is a flow's)."""
    if ((frame[12] << 8) | frame[13]) not in _TAGS:
        return ETH_HLEN
    return ETH_HLEN + 8 if ((frame[16] << 8) | frame[17]) == ETH_P_8021Q else ETH_HLEN + 4


def ipv6_walk(frame, l3: int, end: int) -> tuple[int, int, int, int]:
    """The extension headers of the IPv6 packet at `l3`, walked as the switch
    does (at most MAX_IPV6_EXT): (next header, its offset, offset of a real
    fragment header or -1, offset of the byte naming the next header).  The
    walk stops past a real fragment header: the middle of a datagram follows,
    and the fragment header's next header (the same in every fragment) is the
    protocol.  Next header -1: the chain is cut short by the frame's end."""
    prev, nxt, off = l3 + 6, frame[l3 + 6], l3 + IPV6_HLEN
    for _ in range(MAX_IPV6_EXT):
        if nxt not in _IPV6_EXT:
            break
        if off + 8 > end:
            return -1, off, -1, prev
        if nxt == IPV6_FRAGMENT:
            if ((frame[off + 2] << 8) | frame[off + 3]) & 0xFFF9:  # offset or M: not an atomic fragment
                return frame[off], off + 8, off, prev
            step = 8
        elif nxt == IPV6_AH:
            step = (frame[off + 1] + 2) * 4
        else:
            step = (frame[off + 1] + 1) * 8
        prev, nxt, off = off, frame[off], off + step
    return nxt, off, -1, prev


def classify(frame) -> tuple[int, bytes | None, int, int]:
    """Returns (kind, key, direction, l4 offset).  `frame` is bytes-like.
    l4 offset is -1 when the frame has no L4 header to read (fragments); for
    a protocol without ports it is where that protocol's header starts."""
    end = len(frame)
    if end < ETH_HLEN:
        return DROP, None, 0, -1
    et = (frame[12] << 8) | frame[13]
    l3, vlans = ETH_HLEN, NO_VLAN
    if et == ETH_P_8021Q or et == ETH_P_8021AD:
        # one or two tags (outer 802.1Q or 802.1ad, inner 802.1Q): the VIDs join the key
        if end < ETH_HLEN + 4:
            return DROP, None, 0, -1
        et, l3 = (frame[16] << 8) | frame[17], ETH_HLEN + 4
        if et == ETH_P_8021Q:
            if end < ETH_HLEN + 8:
                return DROP, None, 0, -1
            et, l3 = (frame[20] << 8) | frame[21], ETH_HLEN + 8
            vlans = bytes((frame[14] & 0x0F, frame[15], frame[18] & 0x0F, frame[19]))
        else:
            vlans = bytes((frame[14] & 0x0F, frame[15], 0, 0))
        if et == ETH_P_8021Q or et == ETH_P_8021AD:  # deeper: not inspected, and hosts take VID-0 stacks
            return DROP, None, 0, -1
    if et == ETH_P_IP:
        if end < l3 + IPV4_HLEN:
            return DROP, None, 0, -1
        vihl = frame[l3]
        ihl = (vihl & 0x0F) * 4
        tot = (frame[l3 + 2] << 8) | frame[l3 + 3]
        if vihl >> 4 != 4 or ihl < IPV4_HLEN or l3 + ihl > end or tot < ihl or l3 + tot > end:
            return DROP, None, 0, -1
        proto = frame[l3 + 9]
        if proto == ICMP:
            return OTHER, None, 0, -1
        src, dst = V4_MAPPED + bytes(frame[l3 + 12:l3 + 16]), V4_MAPPED + bytes(frame[l3 + 16:l3 + 20])
        fragment = (frame[l3 + 6] & 0x3F) or frame[l3 + 7]  # MF or offset
        return _flow(frame, src, dst, proto, -1 if fragment else l3 + ihl, end, vlans)
    if et == ETH_P_IPV6:
        if end < l3 + IPV6_HLEN or frame[l3] >> 4 != 6 or \
                l3 + IPV6_HLEN + ((frame[l3 + 4] << 8) | frame[l3 + 5]) > end:
            return DROP, None, 0, -1
        nxt, off, frag, _ = ipv6_walk(frame, l3, end)
        if nxt < 0:
            return DROP, None, 0, -1
        if nxt == ICMPV6:
            return OTHER, None, 0, -1
        if (frag < 0 and nxt in _IPV6_EXT) or off > end:  # a chain longer than the walk, or cut short
            return DROP, None, 0, -1
        src, dst = bytes(frame[l3 + 8:l3 + 24]), bytes(frame[l3 + 24:l3 + 40])
        return _flow(frame, src, dst, nxt, -1 if frag >= 0 else off, end, vlans)
    return OTHER, None, 0, -1


def _flow(frame, src: bytes, dst: bytes, proto: int, l4: int, end: int, vlans: bytes):
    """A flow's classification: keyed by ports for TCP/UDP with a header
    (l4 >= 0), without them for fragments (l4 -1) and other protocols."""
    if l4 >= 0 and (proto == TCP or proto == UDP):
        ports = _ports(frame, l4, end, proto)
        if ports is None:
            return DROP, None, 0, -1
        key, d = canonical(src, ports[:2], dst, ports[2:], proto, vlans)
        return FLOW, key, d, l4
    key, d = canonical(src, _NO_PORTS, dst, _NO_PORTS, proto, vlans)
    return FLOW, key, d, l4


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
        self.l4 = l4          # offset of the TCP/UDP (or other protocol's) header, -1 for a fragment
        self.proto = proto    # TCP (6), UDP (17) or another IP protocol (ports 0)
        self.now = now        # the runtime's clock (time.monotonic) for this batch

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def l3(self) -> int:
        """Offset of the IP header (past any VLAN tags)."""
        return l3_offset(self.frame)

    @property
    def ip_version(self) -> int:
        return self.frame[self.l3] >> 4

    @property
    def src(self) -> str:
        return self._addr(12, 8)

    @property
    def dst(self) -> str:
        return self._addr(16, 24)

    def _addr(self, v4: int, v6: int) -> str:
        import ipaddress
        f, l3 = self.frame, self.l3
        if f[l3] >> 4 == 4:
            return str(ipaddress.IPv4Address(bytes(f[l3 + v4:l3 + v4 + 4])))
        return str(ipaddress.IPv6Address(bytes(f[l3 + v6:l3 + v6 + 16])))

    @property
    def sport(self) -> int:
        l4 = self.l4
        return (self.frame[l4] << 8) | self.frame[l4 + 1] if l4 >= 0 and self.proto in PORTED else 0

    @property
    def dport(self) -> int:
        l4 = self.l4
        return (self.frame[l4 + 2] << 8) | self.frame[l4 + 3] if l4 >= 0 and self.proto in PORTED else 0

    @property
    def is_tcp(self) -> bool:
        return self.proto == TCP

    @property
    def tcp_flags(self) -> int:
        l4 = self.l4
        return self.frame[l4 + 13] if l4 >= 0 and self.proto == TCP else 0

    @property
    def seq(self) -> int:
        l4 = self.l4
        if l4 < 0 or self.proto != TCP:
            return 0
        f = self.frame
        return (f[l4 + 4] << 24) | (f[l4 + 5] << 16) | (f[l4 + 6] << 8) | f[l4 + 7]

    @property
    def ack(self) -> int:
        l4 = self.l4
        if l4 < 0 or self.proto != TCP:
            return 0
        f = self.frame
        return (f[l4 + 8] << 24) | (f[l4 + 9] << 16) | (f[l4 + 10] << 8) | f[l4 + 11]

    @property
    def ip_end(self) -> int:
        """End of the IP packet inside the frame (Ethernet padding excluded)."""
        return self.bounds()[1]

    @property
    def payload_offset(self) -> int:
        """Where the payload starts: past the TCP/UDP header; for another
        protocol, its header is payload."""
        return self.bounds()[0]

    def bounds(self) -> tuple[int, int]:
        """(payload offset, end of the IP packet): one call for both, which
        payload is read from in every TCP parser's per-packet path."""
        f, l4 = self.frame, self.l4
        l3 = ETH_HLEN if ((f[12] << 8) | f[13]) not in _TAGS else l3_offset(f)
        if f[l3] >> 4 == 4:
            end = l3 + ((f[l3 + 2] << 8) | f[l3 + 3])
        else:
            end = l3 + IPV6_HLEN + ((f[l3 + 4] << 8) | f[l3 + 5])
        n = len(f)
        if end > n:
            end = n
        if l4 < 0:
            return end, end
        proto = self.proto
        start = l4 + (f[l4 + 12] >> 4) * 4 if proto == TCP else l4 + 8 if proto == UDP else l4
        return (start if start < end else end), end

    @property
    def payload(self):
        start, end = self.bounds()
        return self.frame[start:end]
