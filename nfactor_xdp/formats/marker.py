"""The migration marker (paper 5): a frame of the migrating flow whose L4
payload is a magic number and a random per-migration nonce.  The source
runtime builds it, the switch agent checks and injects it behind the flow's
frames, and the source recognises it (`carried`: its own nonce, or a copy of
an earlier marker at any time) as the last frame of the flow it will ever see."""
from __future__ import annotations

import os
import struct

from .flowkey import HI_TO_LO, V4_MAPPED
from .headers import (ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN,
                      TCP_ACK)

TCP_HLEN, UDP_HLEN = 20, 8  # as markers carry them: TCP without options

MAGIC = 0x4E46414D524B5200  # "NFAMRK\0" + 0
_PAYLOAD = struct.Struct("!QQ")
PAYLOAD_SIZE = _PAYLOAD.size
MAX_FRAME = 1514            # an Ethernet frame without FCS
_ETH = bytes.fromhex("020000000002" "020000000001")  # never seen by a host: the flow's own path only
_MAGIC_BYTES = struct.pack("!Q", MAGIC)
# Lengths of an untagged IPv4 marker (after a TCP header, or a UDP one or its
# stand-in): the runtime's fast path leaves frames this long to the full parser.
V4_LENGTHS = frozenset(ETH_HLEN + IPV4_HLEN + h + PAYLOAD_SIZE for h in (TCP_HLEN, UDP_HLEN))


def new_nonce() -> int:
    return int.from_bytes(os.urandom(8), "big")


def payload(nonce: int) -> bytes:
    """The 16-byte payload of the marker with this nonce."""
    return _PAYLOAD.pack(MAGIC, nonce)


def is_marker(frame, l4: int, expected: bytes) -> bool:
    """True if `frame` (its L4 header at offset `l4`) ends with exactly the
    marker payload `expected`: the whole 16 bytes, nonce included, so no
    frame of real traffic is taken for it."""
    n = len(expected)
    return l4 >= 0 and len(frame) >= l4 + 8 + n and bytes(frame[-n:]) == expected


def carried(frame, l4: int, proto: int) -> bytes | None:
    """The marker payload `frame` carries, whatever its nonce, or None: a
    marker is known by its form alone, so a copy that comes after any time
    is still one.  The flow's L4 payload (after the TCP header, or after the
    8 bytes of a UDP header, which markers of other protocols carry too) is
    exactly PAYLOAD_SIZE bytes and starts with MAGIC; its end comes from the
    UDP length, or for TCP from the IP header as markers build it (IPv4
    without options, IPv6 without extensions), so bytes after the packet
    (Ethernet padding) do not matter.  Real traffic is never taken for a
    marker by chance: that takes those 8 bytes in a payload of exactly 16."""
    if l4 < 0 or len(frame) < l4 + 8 + PAYLOAD_SIZE:
        return None
    if proto != IPPROTO_TCP:
        start, end = l4 + 8, l4 + ((frame[l4 + 4] << 8) | frame[l4 + 5])
    else:
        start = l4 + (frame[l4 + 12] >> 4) * 4
        if l4 >= ETH_HLEN + IPV4_HLEN and frame[l4 - IPV4_HLEN] == 0x45:
            end = l4 - IPV4_HLEN + ((frame[l4 - 18] << 8) | frame[l4 - 17])
        elif l4 >= ETH_HLEN + IPV6_HLEN and frame[l4 - IPV6_HLEN] >> 4 == 6:
            end = l4 + ((frame[l4 - 36] << 8) | frame[l4 - 35])
        else:
            return None
    if end - start != PAYLOAD_SIZE or end > len(frame) or frame[start:start + 8] != _MAGIC_BYTES:
        return None
    return bytes(frame[start:end])


def _tags(key: bytes) -> bytes:
    """The flow's VLAN tags (802.1ad outside 802.1Q when there are two):
    the parsers key them by VID only, so these name the flow's VLANs."""
    outer, inner = key[40:42], key[42:44]
    if inner != b"\0\0":
        return struct.pack("!H", ETH_P_8021AD) + outer + struct.pack("!H", ETH_P_8021Q) + inner
    if outer != b"\0\0":
        return struct.pack("!H", ETH_P_8021Q) + outer
    return b""


def frame(key: bytes, orig_dir: int, marker: bytes) -> bytes:
    """A frame of the flow `key` in its first packet's direction carrying
    `marker`: what the runtime's parser files under the flow.  A flow of a
    protocol without ports gets the 8 bytes a UDP header would have (zero
    ports and a length) before the marker."""
    lo, hi = key[0:16], key[16:32]
    lo_port, hi_port, proto = key[32:34], key[34:36], key[36]
    src, dst, sport, dport = (hi, lo, hi_port, lo_port) if orig_dir == HI_TO_LO else (lo, hi, lo_port, hi_port)
    if proto == IPPROTO_TCP:
        l4 = sport + dport + struct.pack("!IIBBHHH", 0, 0, 5 << 4, TCP_ACK, 65535, 0, 0)
    else:
        l4 = sport + dport + struct.pack("!HH", 8 + len(marker), 0)
    l4 += marker
    eth = _ETH + _tags(key)
    if src[:12] == V4_MAPPED:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src[12:], dst[12:])
        return eth + struct.pack("!H", ETH_P_IP) + ip + l4
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
    return eth + struct.pack("!H", ETH_P_IPV6) + ip6 + l4
