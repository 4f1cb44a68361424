/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Frame classification for the switch: a flow with its canonical key (TCP/UDP
 * by ports, fragments and other IP protocols by addresses and protocol, one
 * or two VLAN tags parsed through), "other" traffic (handled by policy: ARP,
 * ICMP, non-IP), or a frame that cannot be inspected (dropped: malformed,
 * more VLAN tags).  The Python runtime mirrors these rules in
 * nfactor_xdp/dataplane/packet.py; both are tested against the same crafted
 * frames and fuzzed against each other (nfactorctl fuzz parsers).
 */
#ifndef NFACTOR_PARSE_H
#define NFACTOR_PARSE_H

#include "nfactor_shared.h"

/* Secondary classifications, reported in *flags (counted by the caller). */
#define NFX_PF_IP_OPTIONS 1
#define NFX_PF_FRAGMENT 2
#define NFX_PF_IPV6_EXT 4
#define NFX_PF_VLAN 8
#define NFX_PF_OTHER_PROTO 16
#define NFX_PF_PAYLOAD 32	/* a TCP or UDP frame with payload bytes (observe mode's filter) */
/* A TCP frame's flags byte (FIN 0x01 ... CWR 0x80) is in *flags, shifted by
 * this much; 0 for frames whose TCP header is not parsed (fragments). */
#define NFX_PF_TCP_FLAGS_SHIFT 8
#define NFX_PF_TCP_FLAGS(flags) (((flags) >> NFX_PF_TCP_FLAGS_SHIFT) & 0xff)

enum nfx_parse_result {
	NFX_PARSE_FLOW = 0,	/* key and dir are set, *flags has NFX_PF_* */
	NFX_PARSE_OTHER = 1,	/* *why = classification counter */
	NFX_PARSE_DROP = 2,	/* *why = drop counter */
};

#define NFX_ETH_P_8021Q 0x8100
#define NFX_ETH_P_8021AD 0x88A8
#define NFX_ETH_P_ARP 0x0806
#define NFX_VLAN_VID 0x0FFF
#define NFX_IP_MF 0x2000
#define NFX_IP_OFFSET 0x1FFF
#define NFX_NEXTHDR_HOP 0
#define NFX_NEXTHDR_ROUTING 43
#define NFX_NEXTHDR_FRAGMENT 44
#define NFX_NEXTHDR_AUTH 51
#define NFX_NEXTHDR_DEST 60
#define NFX_NEXTHDR_ICMPV6 58

/* Orders the endpoints: returns 1 if (a, pa) > (b, pb), comparing the
 * addresses as big-endian numbers, then the ports. */
static __always_inline int nfx_endpoint_gt(__u32 *a, __u16 pa, __u32 *b, __u16 pb)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 x = bpf_ntohl(a[i]), y = bpf_ntohl(b[i]);

		if (x != y)
			return x > y;
	}
	return bpf_ntohs(pa) > bpf_ntohs(pb);
}

static __always_inline void nfx_make_key(struct nfx_flow_key *key, __u8 *dir, __u32 *src,
					 __u32 *dst, __u16 sport, __u16 dport, __u8 proto)
{
	__u32 *lo = (__u32 *)key->lo_addr, *hi = (__u32 *)key->hi_addr;
	int i;

	*dir = nfx_endpoint_gt(src, sport, dst, dport);
#pragma unroll
	for (i = 0; i < 4; i++) {
		lo[i] = *dir ? dst[i] : src[i];
		hi[i] = *dir ? src[i] : dst[i];
	}
	key->lo_port = *dir ? dport : sport;
	key->hi_port = *dir ? sport : dport;
	key->proto = proto;
}

/* Reads the ports of a TCP/UDP header at l4 (and TCP's flags into *flags,
 * NFX_PF_PAYLOAD if the IP payload, which ends at ip_end, goes on past the
 * L4 header); returns 0 or a drop counter. */
static __always_inline __u32 nfx_l4_ports(void *l4, void *data_end, void *ip_end, __u8 proto,
					  __u16 *sport, __u16 *dport, __u32 *flags)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || th->doff < 5 || l4 + th->doff * 4 > data_end)
			return NFX_CNT_DROP_BAD_L4;
		*sport = th->source;
		*dport = th->dest;
		*flags |= (__u32)((__u8 *)th)[13] << NFX_PF_TCP_FLAGS_SHIFT;
		if (l4 + th->doff * 4 < ip_end)
			*flags |= NFX_PF_PAYLOAD;
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || bpf_ntohs(uh->len) < sizeof(*uh))
			return NFX_CNT_DROP_BAD_L4;
		*sport = uh->source;
		*dport = uh->dest;
		if ((void *)(uh + 1) < ip_end)
			*flags |= NFX_PF_PAYLOAD;
	}
	return 0;
}

static __always_inline int nfx_parse_ipv4(void *nh, void *data_end, struct nfx_flow_key *key,
					  __u8 *dir, __u32 *why, __u32 *flags)
{
	struct iphdr *iph = nh;
	__u32 src[4] = { 0, 0, bpf_htonl(0xffff), 0 }, dst[4] = { 0, 0, bpf_htonl(0xffff), 0 };
	__u16 sport = 0, dport = 0, tot_len;
	__u32 hlen;
	void *l4;

	if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5) {
		*why = NFX_CNT_DROP_BAD_IP;
		return NFX_PARSE_DROP;
	}
	hlen = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	/* Frames may carry Ethernet padding past tot_len, never less than it. */
	if (nh + hlen > data_end || tot_len < hlen || nh + tot_len > data_end) {
		*why = NFX_CNT_DROP_BAD_IP;
		return NFX_PARSE_DROP;
	}
	if (iph->protocol == IPPROTO_ICMP) {
		*why = NFX_CNT_CLS_ICMP;
		return NFX_PARSE_OTHER;
	}
	if (hlen > sizeof(*iph))
		*flags |= NFX_PF_IP_OPTIONS;
	src[3] = iph->saddr;
	dst[3] = iph->daddr;
	if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP) {
		/* GRE, ESP, IP-in-IP, SCTP...: a flow of the host pair, no ports */
		*flags |= NFX_PF_OTHER_PROTO;
	}
	if (iph->frag_off & bpf_htons(NFX_IP_MF | NFX_IP_OFFSET)) {
		/* Only the first fragment has ports: key every fragment without them. */
		*flags |= NFX_PF_FRAGMENT;
	} else if (!(*flags & NFX_PF_OTHER_PROTO)) {
		l4 = nh + hlen;
		*why = nfx_l4_ports(l4, data_end, nh + tot_len, iph->protocol, &sport, &dport, flags);
		if (*why)
			return NFX_PARSE_DROP;
	}
	nfx_make_key(key, dir, src, dst, sport, dport, iph->protocol);
	return NFX_PARSE_FLOW;
}

static __always_inline int nfx_parse_ipv6(void *nh, void *data_end, struct nfx_flow_key *key,
					  __u8 *dir, __u32 *why, __u32 *flags)
{
	struct ipv6hdr *ip6h = nh;
	__u16 sport = 0, dport = 0;
	int fragment = 0, i;
	__u8 next;
	void *p;

	if ((void *)(ip6h + 1) > data_end || ip6h->version != 6 ||
	    nh + sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len) > data_end) {
		*why = NFX_CNT_DROP_BAD_IP;
		return NFX_PARSE_DROP;
	}
	next = ip6h->nexthdr;
	p = ip6h + 1;
	/* Walk a bounded chain of extension headers down to TCP/UDP. */
#pragma unroll
	for (i = 0; i < NFX_MAX_IPV6_EXT; i++) {
		__u8 *ext = p;

		if (next != NFX_NEXTHDR_HOP && next != NFX_NEXTHDR_ROUTING &&
		    next != NFX_NEXTHDR_DEST && next != NFX_NEXTHDR_FRAGMENT &&
		    next != NFX_NEXTHDR_AUTH)
			break;
		*flags |= NFX_PF_IPV6_EXT;
		if ((void *)(ext + 8) > data_end) {
			*why = NFX_CNT_DROP_BAD_IPV6_EXT;
			return NFX_PARSE_DROP;
		}
		if (next == NFX_NEXTHDR_FRAGMENT) {
			next = ext[0];
			p = ext + 8;
			/* offset (13 bits) and M flag; an atomic fragment has neither.
			 * Past a real fragment header lies the middle of a datagram:
			 * its next header (the same in every fragment) is the key's. */
			if (((ext[2] << 8) | ext[3]) & 0xfff9) {
				fragment = 1;
				break;
			}
			continue;
		} else if (next == NFX_NEXTHDR_AUTH) {
			p = ext + (ext[1] + 2) * 4;
		} else {
			p = ext + (ext[1] + 1) * 8;
		}
		next = ext[0];
	}
	if (next == NFX_NEXTHDR_ICMPV6) {
		*why = NFX_CNT_CLS_ICMP;
		return NFX_PARSE_OTHER;
	}
	if (!fragment && (next == NFX_NEXTHDR_HOP || next == NFX_NEXTHDR_ROUTING || next == NFX_NEXTHDR_DEST ||
			  next == NFX_NEXTHDR_FRAGMENT || next == NFX_NEXTHDR_AUTH)) {
		*why = NFX_CNT_DROP_BAD_IPV6_EXT;	/* the chain goes on past the walk */
		return NFX_PARSE_DROP;
	}
	if (p > data_end) {
		*why = NFX_CNT_DROP_BAD_IPV6_EXT;
		return NFX_PARSE_DROP;
	}
	if (next != IPPROTO_TCP && next != IPPROTO_UDP)
		*flags |= NFX_PF_OTHER_PROTO;
	if (fragment) {
		*flags |= NFX_PF_FRAGMENT;
	} else if (!(*flags & NFX_PF_OTHER_PROTO)) {
		*why = nfx_l4_ports(p, data_end, nh + sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len), next,
				    &sport, &dport, flags);
		if (*why)
			return NFX_PARSE_DROP;
	}
	nfx_make_key(key, dir, (__u32 *)&ip6h->saddr, (__u32 *)&ip6h->daddr, sport, dport, next);
	return NFX_PARSE_FLOW;
}

static __always_inline int nfx_parse(void *data, void *data_end, struct nfx_flow_key *key,
				     __u8 *dir, __u32 *why, __u32 *flags)
{
	struct ethhdr *eth = data;
	void *nh = eth + 1;
	__u16 proto;

	if ((void *)(eth + 1) > data_end) {
		*why = NFX_CNT_DROP_SHORT_ETH;
		return NFX_PARSE_DROP;
	}
	proto = bpf_ntohs(eth->h_proto);
	/* One or two tags: outer 802.1Q or 802.1ad, inner 802.1Q; their VIDs
	 * are part of the key.  Anything deeper is not parsed. */
	if (proto == NFX_ETH_P_8021Q || proto == NFX_ETH_P_8021AD) {
		__be16 *tag = nh;

		if ((void *)(tag + 2) > data_end) {
			*why = NFX_CNT_DROP_SHORT_ETH;
			return NFX_PARSE_DROP;
		}
		*flags |= NFX_PF_VLAN;
		key->vlan_outer = tag[0] & bpf_htons(NFX_VLAN_VID);
		proto = bpf_ntohs(tag[1]);
		nh = tag + 2;
		if (proto == NFX_ETH_P_8021Q) {
			tag = nh;
			if ((void *)(tag + 2) > data_end) {
				*why = NFX_CNT_DROP_SHORT_ETH;
				return NFX_PARSE_DROP;
			}
			key->vlan_inner = tag[0] & bpf_htons(NFX_VLAN_VID);
			proto = bpf_ntohs(tag[1]);
			nh = tag + 2;
		}
		/* A deeper stack cannot be inspected, and Linux hosts strip any
		 * number of VID-0 tags: forwarding it would bypass every NF. */
		if (proto == NFX_ETH_P_8021Q || proto == NFX_ETH_P_8021AD) {
			*why = NFX_CNT_DROP_VLAN_DEEP;
			return NFX_PARSE_DROP;
		}
	}
	if (proto == ETH_P_IP)
		return nfx_parse_ipv4(nh, data_end, key, dir, why, flags);
	if (proto == ETH_P_IPV6)
		return nfx_parse_ipv6(nh, data_end, key, dir, why, flags);
	if (proto == NFX_ETH_P_ARP)
		*why = NFX_CNT_CLS_ARP;
	else
		*why = NFX_CNT_CLS_NON_IP;
	return NFX_PARSE_OTHER;
}

#endif /* NFACTOR_PARSE_H */
