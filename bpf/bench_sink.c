/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmarks' sink (nfactor_xdp/tools/bench/load.py), attached to the
 * sink host's eth0 in place of its XDP_PASS program: counts every frame the
 * node delivers and drops it.  Counting in XDP keeps the sink far faster than
 * the node, so what it counts is what the node forwarded, not what a socket
 * on the sink could keep up with.
 *
 * Only frames of the current trial's flows (match, set by the harness before
 * each trial) count as forwarded; anything else (neighbour discovery, an
 * earlier trial's stragglers) is counted apart, so that it cannot make up for
 * a lost frame.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

/* the trial's flows: IPv4, proto, dport, sport in [sport_lo, sport_hi] (host order) */
struct match {
	u32 daddr;	/* network order */
	u16 dport;
	u16 sport_lo;
	u16 sport_hi;
	u8 proto;
	u8 pad;
};

enum { SINK_TRIAL = 0, SINK_OTHER = 1 };

BPF_ARRAY(match, struct match, 1);
/* frames received, per CPU (summed by the reader): SINK_TRIAL, SINK_OTHER */
BPF_PERCPU_ARRAY(rx, u64, 2);

static __always_inline int is_trial(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct udphdr *l4;	/* ports: the first 4 bytes of TCP and UDP alike */
	u32 zero = 0;
	struct match *m = match.lookup(&zero);
	u16 sport;

	if (!m || (void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (ip->ihl != 5 || ip->protocol != m->proto || ip->daddr != m->daddr)
		return 0;
	l4 = (void *)(ip + 1);
	if ((void *)(l4 + 1) > end || l4->dest != bpf_htons(m->dport))
		return 0;
	sport = bpf_ntohs(l4->source);
	return sport >= m->sport_lo && sport <= m->sport_hi;
}

int sink(struct xdp_md *ctx)
{
	u32 i = is_trial(ctx) ? SINK_TRIAL : SINK_OTHER;
	u64 *c = rx.lookup(&i);

	if (c)
		*c += 1;
	return XDP_DROP;
}
