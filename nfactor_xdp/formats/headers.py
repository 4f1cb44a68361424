"""Numbers and offsets of the Ethernet, VLAN, IP, TCP and UDP headers that
the runtime's parser, the reassembler, the marker and the benchmarks all read
or write (offsets: untagged frames)."""
from __future__ import annotations

ETH_HLEN = 14
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8   # VLAN tags: 4 bytes (TCI, then the next ethertype)
VLAN_HLEN, VLAN_VID = 4, 0x0FFF
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IPV4_HLEN, IPV6_HLEN = 20, 40
V4_L4 = ETH_HLEN + IPV4_HLEN         # where TCP/UDP starts in an IPv4 frame without options
V6_L4 = ETH_HLEN + IPV6_HLEN         # ... in an IPv6 frame without extension headers
# offsets in an IPv4 frame
V4_TOT_LEN, V4_FRAG, V4_PROTO, V4_SRC, V4_DST = 16, 20, 23, 26, 30
# offsets in an IPv6 frame
V6_PAYLOAD_LEN, V6_NEXT, V6_SRC, V6_DST = 18, 20, 22, 38
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# IP protocols by the names rules, flow keys and the CLI use (any number 0-255 is a protocol too)
IP_PROTOS = {"icmp": 1, "ipip": 4, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "ipv6": 41, "gre": 47, "esp": 50,
             "ah": 51, "icmpv6": IPPROTO_ICMPV6, "ospf": 89, "pim": 103, "vrrp": 112, "l2tp": 115, "sctp": 132,
             "udplite": 136}
