"""The migration marker (paper 5): a frame of the migrating flow whose L4
payload is a magic number and a random per-migration nonce.  The source
runtime builds it, the switch agent checks and injects it behind the flow's
frames, and the source recognises it with `is_marker` as the last frame of
the flow it will ever see."""
from __future__ import annotations

import os
import struct

from .flowkey import HI_TO_LO, V4_MAPPED
from .headers import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK

MAGIC = 0x4E46414D524B5200  # "NFAMRK\0" + 0
_PAYLOAD = struct.Struct("!QQ")
PAYLOAD_SIZE = _PAYLOAD.size
MAX_FRAME = 1514            # an Ethernet frame without FCS
_ETH = bytes.fromhex("020000000002" "020000000001")  # never seen by a host: the flow's own path only


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


def frame(key: bytes, orig_dir: int, marker: bytes) -> bytes:
    """A frame of the flow `key` in its first packet's direction carrying
    `marker`: what the runtime's parser files under the flow."""
    lo, hi = key[0:16], key[16:32]
    lo_port, hi_port, proto = key[32:34], key[34:36], key[36]
    src, dst, sport, dport = (hi, lo, hi_port, lo_port) if orig_dir == HI_TO_LO else (lo, hi, lo_port, hi_port)
    if proto == IPPROTO_TCP:
        l4 = sport + dport + struct.pack("!IIBBHHH", 0, 0, 5 << 4, TCP_ACK, 65535, 0, 0)
    else:
        l4 = sport + dport + struct.pack("!HH", 8 + len(marker), 0)
    l4 += marker
    if src[:12] == V4_MAPPED:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src[12:], dst[12:])
        return _ETH + struct.pack("!H", ETH_P_IP) + ip + l4
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
    return _ETH + struct.pack("!H", ETH_P_IPV6) + ip6 + l4
