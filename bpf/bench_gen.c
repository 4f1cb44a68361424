/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmarks' traffic generator (nfactor_xdp/tools/bench/load.py).  Run
 * with BPF_PROG_TEST_RUN in live-frames mode on the source host's eth0: every
 * run of the program turns the one template frame into the next frame of the
 * load and sends it with XDP_TX.  Generating in XDP is what lets one CPU
 * offer several Mpps, far more than a socket could.
 *
 * The source port rotates over params.flows flows from params.base.  With
 * params.tcp, each frame carries a whole HTTP request at the flow's next
 * sequence number (every frame a new request to parse: the parser's worst
 * case).  With params.gap_ns, frames are paced that far apart; the runs that
 * fall between two frames drop and are not counted in pace.sent.  The
 * generator zeroes pace before each run, so every run starts with the first
 * frame of each flow (sequence number 1) and without a catch-up burst.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

/* set by the generator process before each call */
struct params {
	u32 base;	/* first source port */
	u32 flows;	/* source ports base .. base + flows - 1 */
	u32 tcp;	/* 1: TCP with an HTTP request, 0: UDP */
	u32 step;	/* TCP sequence step: the request's length */
	u64 gap_ns;	/* pacing; 0: as fast as the CPU goes */
	u32 prog_id;	/* this program's id, its ifindex and the generator's */
	u32 ifindex;	/* process: to tell its failed transmits from others' */
	u32 tgid;
	u32 pad;
};

/* per CPU: the test run stays on the generator's CPU */
struct pace {
	u64 next_ns;	/* earliest time of the next frame */
	u64 sent;	/* frames sent (XDP_TX), read by the generator */
	u64 failed;	/* of those, frames the veth did not take (not offered) */
	u32 seq;	/* frames generated so far: picks flow and sequence number */
	u32 pad;
};

BPF_PERCPU_ARRAY(pace, struct pace, 1);
BPF_ARRAY(params, struct params, 1);

int gen(struct xdp_md *ctx)
{
	void *data, *end, *l4;
	u32 zero = 0, n, f;
	struct pace *s = pace.lookup(&zero);
	struct params *p = params.lookup(&zero);

	/* The template ends with a spare byte, cut on every run.  Live-frames
	 * mode rebuilds a recycled frame from its context only if the program
	 * changed the context, and the switch lengthens every frame it sends to
	 * a runtime (the ingress tag in front), in that same frame: without the
	 * cut each frame would grow by a byte every time it is reused. */
	if (bpf_xdp_adjust_tail(ctx, -1))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	l4 = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	if (!s || !p || p->flows == 0)
		return XDP_ABORTED;
	if (p->gap_ns) {
		/* paced: frames leave evenly spaced; the loop spins through the rest */
		u64 now = bpf_ktime_get_ns();

		if (!s->next_ns)	/* a new run (state zeroed): start now, no burst */
			s->next_ns = now;
		if (now < s->next_ns)
			return XDP_DROP;
		s->next_ns += p->gap_ns;
		if (s->next_ns + 32 * p->gap_ns < now)	/* fell behind: catch up by 32 frames at most */
			s->next_ns = now - 32 * p->gap_ns;
	}
	s->sent++;
	n = s->seq++;
	f = n % p->flows;
	if (p->tcp) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return XDP_ABORTED;
		th->source = bpf_htons(p->base + f);
		th->seq = bpf_htonl(1 + (n / p->flows) * p->step);
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return XDP_ABORTED;
		uh->source = bpf_htons(p->base + f);
	}
	return XDP_TX;
}

/*
 * A frame counted in pace.sent can still fail to leave: the kernel turns
 * XDP_TX into a redirect to the same device, refused at once when the peer
 * cannot take XDP frames (xdp_redirect_err) or dropped when its ring is
 * full (xdp_devmap_xmit).  No device counter sees either, so count them here.
 */
static __always_inline void count_failed(u64 n)
{
	u32 zero = 0;
	struct pace *s = pace.lookup(&zero);

	if (s)
		s->failed += n;
}

TRACEPOINT_PROBE(xdp, xdp_redirect_err)
{
	u32 zero = 0;
	struct params *p = params.lookup(&zero);

	if (p && p->prog_id && args->prog_id == p->prog_id)
		count_failed(1);
	return 0;
}

TRACEPOINT_PROBE(xdp, xdp_devmap_xmit)
{
	u32 zero = 0;
	struct params *p = params.lookup(&zero);

	/* XDP_TX: from and to the generator's device, in its own process */
	if (p && args->drops > 0 && args->from_ifindex == p->ifindex && args->to_ifindex == p->ifindex &&
	    bpf_get_current_pid_tgid() >> 32 == p->tgid)
		count_failed(args->drops);
	return 0;
}
