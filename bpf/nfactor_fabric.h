/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The fabric encapsulation between the node's hosts (nfactor_shared.h,
 * "Hosts"): outer Ethernet, IPv4 and UDP headers and struct nfx_fabric_hdr,
 * whose last byte is the ingress tag already in front of the frame.  Packet
 * work only: the maps are used by the program that includes this.
 */
#ifndef NFACTOR_FABRIC_H
#define NFACTOR_FABRIC_H

#include "nfactor_shared.h"

#define NFX_FABRIC_PUSH (NFX_FABRIC_ENCAP_LEN - NFX_INGRESS_TAG_LEN)
#define NFX_IP_DF 0x4000
#define NFX_IP_MF_OFFSET 0x3fff

struct nfx_fabric_outer {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct nfx_fabric_hdr hdr;
} __attribute__((packed));

static __always_inline __u16 nfx_ipv4_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* Put the outer headers in front of [tag][frame]; 0, or -1 if there is no
 * room.  `self` and `to` are the two hosts' entries. */
static __always_inline int nfx_fabric_encap(struct xdp_md *ctx, struct nfx_host *self, struct nfx_host *to,
					    __u32 runtime)
{
	struct nfx_fabric_outer *o;
	void *data, *data_end;
	__u32 len;

	if (bpf_xdp_adjust_head(ctx, -NFX_FABRIC_PUSH))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	o = data;
	if ((void *)(o + 1) > data_end)
		return -1;
	len = (data_end - data) & 0xffff;
	__builtin_memcpy(o->eth.h_dest, to->mac, ETH_ALEN);
	__builtin_memcpy(o->eth.h_source, self->mac, ETH_ALEN);
	o->eth.h_proto = bpf_htons(ETH_P_IP);
	o->ip.version = 4;
	o->ip.ihl = 5;
	o->ip.tos = 0;
	o->ip.tot_len = bpf_htons(len - sizeof(struct ethhdr));
	o->ip.id = 0;
	o->ip.frag_off = bpf_htons(NFX_IP_DF);
	o->ip.ttl = 64;
	o->ip.protocol = IPPROTO_UDP;
	o->ip.saddr = *(__u32 *)self->ipv4;
	o->ip.daddr = *(__u32 *)to->ipv4;
	o->ip.check = 0;
	o->ip.check = nfx_ipv4_csum(&o->ip);
	o->udp.source = bpf_htons(NFX_FABRIC_SRC_PORT + runtime);
	o->udp.dest = bpf_htons(NFX_FABRIC_UDP_PORT);
	o->udp.len = bpf_htons(len - sizeof(struct ethhdr) - sizeof(struct iphdr));
	o->udp.check = 0;	/* none: allowed over IPv4; the frame inside keeps its own */
	o->hdr.magic = NFX_FABRIC_MAGIC;
	o->hdr.version = NFX_FABRIC_VERSION;
	o->hdr.runtime = runtime;
	return 0;
}

enum nfx_fabric_class {
	NFX_FABRIC_NOT_OURS = 0,	/* not encapsulated for this host: its stack's */
	NFX_FABRIC_BAD = 1,		/* for this host, malformed */
	NFX_FABRIC_OK = 2,
};

/* Classify a frame received on the fabric port; on NFX_FABRIC_OK, *o points
 * at its outer headers. */
static __always_inline int nfx_fabric_classify(struct xdp_md *ctx, struct nfx_host *self,
					       struct nfx_fabric_outer **out)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct nfx_fabric_outer *o = data;

	/* up to the UDP header: is it for this host's fabric port at all? */
	if ((void *)&o->hdr > data_end)
		return NFX_FABRIC_NOT_OURS;	/* ARP and the like */
	if (o->eth.h_proto != bpf_htons(ETH_P_IP) || o->ip.version != 4 || o->ip.protocol != IPPROTO_UDP ||
	    o->ip.daddr != *(__u32 *)self->ipv4)
		return NFX_FABRIC_NOT_OURS;
	/* IP options would move the UDP header: the host's own, unless to our port */
	if (o->ip.ihl != 5)
		return NFX_FABRIC_NOT_OURS;
	if (o->udp.dest != bpf_htons(NFX_FABRIC_UDP_PORT))
		return NFX_FABRIC_NOT_OURS;
	if ((void *)(o + 1) > data_end)
		return NFX_FABRIC_BAD;	/* ours, but too short for the header */
	if (o->ip.frag_off & bpf_htons(NFX_IP_MF_OFFSET))
		return NFX_FABRIC_BAD;
	if (bpf_ntohs(o->ip.tot_len) != (__u32)(data_end - data) - sizeof(struct ethhdr) ||
	    bpf_ntohs(o->udp.len) != bpf_ntohs(o->ip.tot_len) - sizeof(struct iphdr))
		return NFX_FABRIC_BAD;
	if (o->hdr.magic != NFX_FABRIC_MAGIC || o->hdr.version != NFX_FABRIC_VERSION)
		return NFX_FABRIC_BAD;
	if ((void *)o + NFX_FABRIC_ENCAP_LEN + sizeof(struct ethhdr) > data_end)
		return NFX_FABRIC_BAD;	/* no frame inside */
	*out = o;
	return NFX_FABRIC_OK;
}

#endif /* NFACTOR_FABRIC_H */
