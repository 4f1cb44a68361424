/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The node's virtual switch (paper 3.2), attached to both external ports and
 * to the switch-side end of every runtime port.
 *
 *   external port:  parse -> flow table -> new flow? place it round-robin on
 *                   a running runtime -> put the ingress tag (the port the
 *                   frame came in on) in front -> redirect to that runtime's port
 *   runtime port:   frames coming back from a runtime -> read and remove the
 *                   tag -> redirect out of the other external port (bump
 *                   in the wire: ext0 <-> ext1).  No flow lookup: a frame's
 *                   egress depends on its own ingress only, so nothing sent
 *                   from one side can steer the other side's frames.
 *
 * In lookup mode (config.mode) flows are parsed, looked up and placed as
 * usual, then sent straight out of the opposite external port.
 *
 * Offloaded flows (docs/offload.md): a flow entry may name a slot of the
 * offloads array that its runtime wrote; the switch then forwards (or drops)
 * the flow's frames itself, counting them in the slot, and sends the runtime
 * only TCP frames with a flag the runtime asked to see.  In observe mode it
 * also copies each forwarded frame into the runtime's observe ring, where
 * the NFs that only observe read it; a copy without room is counted lost.
 *
 * Hosts (nfactor_shared.h): on the ingress host (config.host_id 0) a frame
 * for a runtime on another host goes out of the fabric port encapsulated
 * (nfactor_fabric.h), and one that comes back over the fabric is unwrapped
 * and leaves by its tag's port.  On a worker host the same program, attached
 * to the fabric port and to its runtimes' ports, unwraps frames for its own
 * runtimes and wraps their frames back to the ingress.  Encapsulated frames
 * that name a runtime not on the expected host are dropped and counted;
 * whatever else arrives on the fabric port goes to the host's stack.
 *
 * Traffic that is not a flow (nfactor_parse.h) gets config.other_action.  Every verdict
 * and every drop reason has a counter (enum nfx_counter).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "nfactor_maps.h"
#include "nfactor_parse.h"
#include "nfactor_fabric.h"

/* devmap: slot -> ifindex (NFX_SLOT_EXT0/1, NFX_SLOT_RT_BASE + runtime id) */
struct tx_ports_table_t {
	__u32 key;
	int leaf;
	__u64 (*redirect_map)(int, int);
	__u32 max_entries;
};
__attribute__((section("maps/devmap:" NFX_PIN("tx_ports"))))
struct tx_ports_table_t tx_ports = { .max_entries = NFX_DEVMAP_SIZE };

static __always_inline void nfx_count(__u32 idx)
{
	__u64 *c = counters.lookup(&idx);

	if (c)
		*c += 1;
}

static __always_inline void count_classes(__u32 flags)
{
	if (flags & NFX_PF_IP_OPTIONS)
		nfx_count(NFX_CNT_CLS_IP_OPTIONS);
	if (flags & NFX_PF_FRAGMENT)
		nfx_count(NFX_CNT_CLS_FRAGMENT);
	if (flags & NFX_PF_IPV6_EXT)
		nfx_count(NFX_CNT_CLS_IPV6_EXT);
	if (flags & NFX_PF_VLAN)
		nfx_count(NFX_CNT_CLS_VLAN);
	if (flags & NFX_PF_OTHER_PROTO)
		nfx_count(NFX_CNT_CLS_OTHER_PROTO);
}

#define NFX_RR_TRIES 4

/* per-CPU round-robin cursor: no shared cache line on the new-flow path */
BPF_PERCPU_ARRAY(rr_cursor, __u32, 1);

static __always_inline int redirect_slot(__u32 slot)
{
	int act = tx_ports.redirect_map(slot, XDP_DROP);

	if (act != XDP_REDIRECT)
		nfx_count(NFX_CNT_DROP_NO_PORT);
	return act;
}

static __always_inline int other_verdict(struct nfx_config *cfg, __u32 in_port)
{
	switch (cfg->other_action) {
	case NFX_OTHER_PASS:
		nfx_count(NFX_CNT_OTHER_PASS);
		return XDP_PASS;
	case NFX_OTHER_DROP:
		nfx_count(NFX_CNT_OTHER_DROP);
		return XDP_DROP;
	default:
		nfx_count(NFX_CNT_OTHER_FORWARD);
		return redirect_slot(in_port ? NFX_SLOT_EXT0 : NFX_SLOT_EXT1);
	}
}

static __always_inline int runtime_running(__u32 id)
{
	struct nfx_runtime *rt = runtimes.lookup(&id);

	return rt && rt->state == NFX_RT_RUNNING;
}


/* Pick the next running runtime; -1 if there is none. */
static __always_inline int pick_runtime(void)
{
	__u32 zero = 0, count, start, i;
	struct nfx_rr_table *rr = rr_table.lookup(&zero);
	__u32 *cursor = rr_cursor.lookup(&zero);

	if (!rr || !cursor)
		return -1;
	count = rr->count;
	if (count == 0)
		return -1;
	if (count > NFX_MAX_RUNTIMES)
		count = NFX_MAX_RUNTIMES;
	start = *cursor;
	*cursor = start + 1;
	/* Userspace lists a runtime only while it is running (it updates the
	 * state first when adding, the list first when removing), but a reader
	 * can see a list half rewritten: check the pick, try a few next ones. */
#pragma unroll
	for (i = 0; i < NFX_RR_TRIES; i++) {
		__u32 idx = (start + i) % count, id;

		/* keep the compiler from folding the mask into the modulo */
		asm volatile("" : "+r"(idx));
		id = rr->ids[idx & (NFX_MAX_RUNTIMES - 1)];

		if (id < NFX_MAX_RUNTIMES && runtime_running(id))
			return id;
	}
	return -1;
}

/* Place a flow; returns its runtime, or -1 (counted). */
static __always_inline int place_flow(struct nfx_flow_key *key, __u8 dir, int replace)
{
	struct nfx_flow entry = {};
	struct nfx_flow *flow;
	struct nfx_rt_stats *st;
	int rt = pick_runtime();
	__u32 rt_id;
	int err;

	if (rt < 0) {
		nfx_count(NFX_CNT_DROP_NO_RUNTIME);
		return -1;
	}
	entry.runtime = rt;
	entry.orig_dir = dir;
	entry.created_ns = bpf_ktime_get_ns();
	/* insert() is BPF_NOEXIST: if another CPU placed the flow first, keep its choice */
	if (replace)
		err = flows.update(key, &entry);
	else
		err = flows.insert(key, &entry);
	if (err == -17 /* EEXIST */) {
		nfx_count(NFX_CNT_FLOW_RACE);
		flow = flows.lookup(key);
		return flow ? (int)flow->runtime : -1;
	} else if (err) {
		nfx_count(NFX_CNT_DROP_MAP_FULL);
		return -1;
	}
	/* No lookup of the new entry: a lookup would set its LRU reference bit.
	 * Unreferenced until the flow's second frame, a one-packet flow is among
	 * the first the LRU evicts, before flows with traffic (measured in
	 * docs/architecture.md). */
	rt_id = rt;
	nfx_count(replace ? NFX_CNT_FLOW_REPLACED : NFX_CNT_FLOW_NEW);
	st = rt_stats.lookup(&rt_id);
	if (st)
		st->flows_placed++;
	return rt;
}

/* Put the ingress tag in front: NFX_INGRESS_TAG | the external port the
 * frame came in on. */
static __always_inline int add_ingress_tag(struct xdp_md *ctx, __u32 in_port)
{
	void *data, *data_end;
	__u8 *t;

	if (bpf_xdp_adjust_head(ctx, -NFX_INGRESS_TAG_LEN))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	t = data;
	if ((void *)(t + NFX_INGRESS_TAG_LEN) > data_end)
		return -1;
	*t = NFX_INGRESS_TAG | in_port;
	return 0;
}

/* Read and remove the ingress tag; returns the ingress port (0/1), or -1. */
static __always_inline int take_ingress_tag(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *t = data, tag;

	if (data + NFX_INGRESS_TAG_LEN + sizeof(struct ethhdr) > data_end)
		return -1;
	tag = *t;
	if ((tag & ~NFX_INGRESS_PORT_MASK) != NFX_INGRESS_TAG)
		return -1;
	if (bpf_xdp_adjust_head(ctx, NFX_INGRESS_TAG_LEN))
		return -1;
	return tag & NFX_INGRESS_PORT_MASK;
}

/* Refill a bucket of `size` tokens at `rate` per second for `elapsed` ns;
 * in nanotokens.  Fills up rather than computing past the room left, so no
 * product can overflow however long the flow was idle. */
static __always_inline __u64 refill(__u64 tokens, __u64 rate, __u64 size, __u64 elapsed)
{
	__u64 cap = size * NFX_NANOTOKENS;

	if (tokens >= cap || elapsed > (cap - tokens) / rate)
		return cap;
	return tokens + elapsed * rate;
}

/* A FORWARD slot's token buckets: 1 if the frame passes (its tokens taken),
 * 0 if not (nothing taken).  Unlocked: CPUs handling one flow at the same
 * time can take the same tokens, so a flow spread over several CPUs may pass
 * a few frames more than its bucket holds.  Tolerated: a flow's frames
 * mostly arrive on one queue, so one CPU. */
static __always_inline int bucket_pass(struct nfx_offload *s, __u64 now, __u32 len)
{
	__u64 elapsed = now > s->stamp_ns ? now - s->stamp_ns : 0;
	__u64 tokens = s->tokens, btokens = s->btokens;
	__u64 need = (__u64)len * NFX_NANOTOKENS;
	int pass = 1;

	if (s->pps) {
		tokens = refill(tokens, s->pps, s->burst, elapsed);
		if (tokens < NFX_NANOTOKENS)
			pass = 0;
	}
	if (s->bps) {
		btokens = refill(btokens, s->bps, s->byte_burst, elapsed);
		if (btokens < need)
			pass = 0;
	}
	if (pass) {
		if (s->pps)
			tokens -= NFX_NANOTOKENS;
		if (s->bps)
			btokens -= need;
	}
	s->tokens = tokens;
	s->btokens = btokens;
	s->stamp_ns = now;
	return pass;
}

/* Copy the frame into ring `ring` with a header reserving `room` bytes for
 * it (a constant, as the ring wants); 0 on success. */
static __always_inline int copy_frame(struct xdp_md *ctx, void *ring, __u32 room, __u32 idx, __u32 d,
				      __u64 len)
{
	struct nfx_copy *c;

	if (len < sizeof(struct ethhdr) || len > room)
		return -1;
	c = bpf_ringbuf_reserve(ring, sizeof(*c) + room, 0);
	if (!c)
		return -1;
	c->slot = idx;
	c->len = len;
	c->dir = d;
	c->pad = 0;
	if (bpf_xdp_load_bytes(ctx, 0, (void *)(c + 1), len) < 0) {
		bpf_ringbuf_discard(c, BPF_RB_NO_WAKEUP);
		return -1;
	}
	bpf_ringbuf_submit(c, 0);
	return 0;
}

/* Observe mode: a copy of a forwarded frame for the runtime's NFs that only
 * observe.  The frame is forwarded whatever happens here: a copy that finds
 * no room is counted as lost, in the slot (the runtime marks the gap in the
 * NFs' state) and in the switch's counters. */
static __always_inline void observe(struct xdp_md *ctx, struct nfx_offload *s, __u32 idx, __u32 rt,
				    __u32 d, __u32 flags, __u32 frame_len)
{
	__u64 len = frame_len & 0xffff;
	void *ring;
	int err = -1;

	if (s->observe == NFX_OBSERVE_PAYLOAD && !(flags & NFX_PF_PAYLOAD))
		return;
	ring = observers.lookup(&rt);
	if (ring) {
		if (len <= NFX_COPY_SMALL)
			err = copy_frame(ctx, ring, NFX_COPY_SMALL, idx, d, len);
		else if (len <= NFX_COPY_MAX)
			err = copy_frame(ctx, ring, NFX_COPY_MAX, idx, d, len);
	}
	if (err) {
		__sync_fetch_and_add(&s->observe_lost[d], 1);
		nfx_count(NFX_CNT_OFF_OBSERVE_LOST);
	} else {
		__sync_fetch_and_add(&s->observed[d], 1);
		nfx_count(NFX_CNT_OFF_OBSERVED);
	}
}

/* A frame of an offloaded flow (slot index + 1 in `off`, placed on `rt`):
 * its verdict, or -1 to send it to the runtime as usual. */
static __always_inline int offload_verdict(struct xdp_md *ctx, __u32 off, __u32 rt, __u8 dir, __u32 flags,
					   __u32 len, __u32 in_port)
{
	__u32 idx = off - 1, d = dir & 1, action;
	struct nfx_offload *s = offloads.lookup(&idx);
	__u64 now;

	if (!s) {
		nfx_count(NFX_CNT_OFF_STALE);
		return -1;
	}
	/* read once: the owner clears it in place to revoke */
	action = *(volatile __u32 *)&s->action;
	if ((action != NFX_OFF_FORWARD && action != NFX_OFF_DROP) || s->runtime != rt) {
		nfx_count(NFX_CNT_OFF_STALE);
		return -1;
	}
	if (NFX_PF_TCP_FLAGS(flags) & s->punt_tcp_flags) {
		nfx_count(NFX_CNT_OFF_PUNT);
		return -1;
	}
	/* atomic: frames of one flow on several CPUs all count */
	__sync_fetch_and_add(&s->packets[d], 1);
	__sync_fetch_and_add(&s->bytes[d], len);
	now = bpf_ktime_get_ns();
	s->last_seen_ns = now;
	if (action == NFX_OFF_DROP) {
		nfx_count(NFX_CNT_OFF_DROP);
		return XDP_DROP;
	}
	if ((s->pps || s->bps) && !bucket_pass(s, now, len)) {
		__sync_fetch_and_add(&s->bucket_dropped[d], 1);
		__sync_fetch_and_add(&s->bucket_dropped_bytes[d], len);
		nfx_count(NFX_CNT_OFF_BUCKET_DROP);
		return XDP_DROP;
	}
	if (s->observe)
		observe(ctx, s, idx, rt, d, flags, len);
	nfx_count(NFX_CNT_OFF_FORWARD);
	return redirect_slot(in_port ? NFX_SLOT_EXT0 : NFX_SLOT_EXT1);
}

/* [tag][frame] to runtime `rt` on host `to`, over the fabric. */
static __always_inline int to_host(struct xdp_md *ctx, __u32 self_id, __u32 to_id, __u32 rt)
{
	struct nfx_host *self = hosts.lookup(&self_id), *to = hosts.lookup(&to_id);

	if (!self || !to || !(self->flags & NFX_HOST_KNOWN) || !(to->flags & NFX_HOST_KNOWN) ||
	    (to->flags & NFX_HOST_FENCED)) {
		nfx_count(NFX_CNT_DROP_NO_HOST);
		return XDP_DROP;
	}
	if (nfx_fabric_encap(ctx, self, to, rt)) {
		nfx_count(NFX_CNT_DROP_NO_HEADROOM);
		return XDP_DROP;
	}
	nfx_count(NFX_CNT_TO_FABRIC);
	return redirect_slot(NFX_SLOT_FABRIC);
}

static __always_inline int from_external(struct xdp_md *ctx, struct nfx_config *cfg, __u32 in_port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct nfx_flow_key key = {};
	struct nfx_flow *flow;
	struct nfx_rt_stats *st;
	__u32 why = 0, flags = 0, rt, len, off = 0;
	struct nfx_runtime *r;
	__u8 dir = 0;
	int cls, placed, verdict, kept = 0;

	nfx_count(NFX_CNT_RX_EXT);
	if (cfg->mode == NFX_MODE_BYPASS) {
		nfx_count(NFX_CNT_BYPASS);
		return redirect_slot(in_port ? NFX_SLOT_EXT0 : NFX_SLOT_EXT1);
	}
	cls = nfx_parse(data, data_end, &key, &dir, &why, &flags);
	count_classes(flags);
	if (cls == NFX_PARSE_DROP) {
		nfx_count(why);
		return XDP_DROP;
	}
	if (cls == NFX_PARSE_OTHER) {
		nfx_count(why);
		return other_verdict(cfg, in_port);
	}

	flow = flows.lookup(&key);
	r = 0;
	if (flow) {
		rt = flow->runtime;
		r = runtimes.lookup(&rt);
	}
	/* a flow keeps its runtime in every state but NONE (slot emptied for good) */
	if (!flow)
		placed = place_flow(&key, dir, 0);
	else if (!r || r->state == NFX_RT_NONE)
		placed = place_flow(&key, dir, 1);
	else {
		placed = flow->runtime;
		off = flow->offload;	/* a re-placed flow starts without one */
		kept = 1;
	}
	if (placed < 0)
		return XDP_DROP;

	rt = placed;
	if (!kept)	/* placed now: its new runtime's entry (a kept flow's was read above) */
		r = runtimes.lookup(&rt);
	if (rt >= NFX_MAX_RUNTIMES)
		return XDP_DROP;
	if (cfg->mode == NFX_MODE_LOOKUP) {
		/* every step of the flow path but the runtime: a ceiling that
		 * costs what the switch costs */
		nfx_count(NFX_CNT_BYPASS);
		return redirect_slot(in_port ? NFX_SLOT_EXT0 : NFX_SLOT_EXT1);
	}
	len = data_end - data;
	if (off) {
		verdict = offload_verdict(ctx, off, rt, dir, flags, len, in_port);
		if (verdict >= 0)
			return verdict;
	}
	if (add_ingress_tag(ctx, in_port)) {
		/* Without it the frame could not find its way back: drop, counted.
		 * XDP frames have XDP_PACKET_HEADROOM in front, so this does not
		 * happen on the drivers and veths this runs on. */
		nfx_count(NFX_CNT_DROP_NO_HEADROOM);
		return XDP_DROP;
	}
	if (r && r->host != cfg->host_id) {
		/* on another host: counted below only if it went (else its drop is) */
		verdict = to_host(ctx, cfg->host_id, r->host, rt);
		if (verdict != XDP_REDIRECT)
			return verdict;
	} else {
		verdict = -1;
	}
	st = rt_stats.lookup(&rt);
	if (st) {
		st->to_rt_packets++;
		st->to_rt_bytes += len;
	}
	nfx_count(NFX_CNT_TO_RUNTIME);
	return verdict >= 0 ? verdict : redirect_slot(NFX_SLOT_RT_BASE + rt);
}

/* A worker host's runtime sends a frame back: to the ingress host, tag kept. */
static __always_inline int worker_from_runtime(struct xdp_md *ctx, struct nfx_config *cfg, __u32 runtime)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct nfx_rt_stats *st;
	__u8 *t = data;
	__u32 len;

	nfx_count(NFX_CNT_RX_RUNTIME);
	if (data + NFX_INGRESS_TAG_LEN + sizeof(struct ethhdr) > data_end ||
	    (*t & ~NFX_INGRESS_PORT_MASK) != NFX_INGRESS_TAG || runtime >= NFX_MAX_RUNTIMES) {
		nfx_count(NFX_CNT_DROP_RT_NO_TAG);
		return XDP_DROP;
	}
	len = data_end - data;
	/* keep the compiler from folding the subtraction into pointer bit work */
	asm volatile("" : "+r"(len));
	st = rt_stats.lookup(&runtime);
	if (st) {
		st->from_rt_packets++;
		st->from_rt_bytes += len - NFX_INGRESS_TAG_LEN;
	}
	return to_host(ctx, cfg->host_id, 0, runtime);
}

static __always_inline int from_runtime(struct xdp_md *ctx, __u32 runtime)
{
	struct nfx_rt_stats *st;
	int in_port;

	nfx_count(NFX_CNT_RX_RUNTIME);
	/* Out of the port opposite to where this very frame came in: no flow
	 * entry needed, so an evicted or re-placed entry cannot misroute it. */
	in_port = take_ingress_tag(ctx);
	if (in_port < 0) {
		nfx_count(NFX_CNT_DROP_RT_NO_TAG);
		return XDP_DROP;
	}
	if (runtime < NFX_MAX_RUNTIMES) {
		st = rt_stats.lookup(&runtime);
		if (st) {
			st->from_rt_packets++;
			st->from_rt_bytes += (long)ctx->data_end - (long)ctx->data;
		}
	}
	nfx_count(NFX_CNT_TO_EXT);
	return redirect_slot(in_port ? NFX_SLOT_EXT0 : NFX_SLOT_EXT1);
}

/* An encapsulated frame from another host (or the host's own traffic). */
static __always_inline int from_fabric(struct xdp_md *ctx, struct nfx_config *cfg)
{
	__u32 self_id = cfg->host_id, rt, from_id, len;
	struct nfx_host *self = hosts.lookup(&self_id), *from;
	struct nfx_fabric_outer *o = 0;
	struct nfx_runtime *r;
	struct nfx_rt_stats *st;
	int cls;

	if (!self) {
		nfx_count(NFX_CNT_FABRIC_PASS);
		return XDP_PASS;
	}
	cls = nfx_fabric_classify(ctx, self, &o);
	if (cls == NFX_FABRIC_BAD) {
		nfx_count(NFX_CNT_DROP_FABRIC_BAD);
		return XDP_DROP;
	}
	if (cls == NFX_FABRIC_NOT_OURS || !o) {
		nfx_count(NFX_CNT_FABRIC_PASS);
		return XDP_PASS;
	}
	rt = o->hdr.runtime;
	r = runtimes.lookup(&rt);
	/* from the runtime's host (ingress) or from the ingress (worker) */
	from_id = self_id == 0 ? (r ? r->host : 0) : 0;
	from = hosts.lookup(&from_id);
	if (!r || r->state == NFX_RT_NONE || (self_id == 0 ? r->host == 0 : r->host != self_id) ||
	    !from || !(from->flags & NFX_HOST_KNOWN) ||
	    o->ip.saddr != *(__u32 *)from->ipv4) {
		nfx_count(NFX_CNT_DROP_FABRIC_RUNTIME);
		return XDP_DROP;
	}
	if (from->flags & NFX_HOST_FENCED) {
		nfx_count(NFX_CNT_DROP_FABRIC_FENCED);
		return XDP_DROP;
	}
	/* the frame inside, without the outer headers and the tag */
	len = bpf_ntohs(o->ip.tot_len) - (NFX_FABRIC_ENCAP_LEN - sizeof(struct ethhdr));
	if (bpf_xdp_adjust_head(ctx, NFX_FABRIC_PUSH)) {
		nfx_count(NFX_CNT_DROP_FABRIC_BAD);
		return XDP_DROP;
	}
	nfx_count(NFX_CNT_RX_FABRIC);
	if (self_id == 0)
		return from_runtime(ctx, rt);
	st = rt_stats.lookup(&rt);
	if (st) {
		st->to_rt_packets++;
		st->to_rt_bytes += len;
	}
	nfx_count(NFX_CNT_TO_RUNTIME);
	return redirect_slot(NFX_SLOT_RT_BASE + rt);
}

int nfx_vswitch(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex, zero = 0;
	struct nfx_port *port = ports.lookup(&ifindex);
	struct nfx_config *cfg = config.lookup(&zero);

	if (!port || !cfg) {
		nfx_count(NFX_CNT_DROP_UNKNOWN_PORT);
		return XDP_DROP;
	}
	switch (port->role) {
	case NFX_PORT_EXT0:
		return from_external(ctx, cfg, 0);
	case NFX_PORT_EXT1:
		return from_external(ctx, cfg, 1);
	case NFX_PORT_RUNTIME:
		if (cfg->host_id)
			return worker_from_runtime(ctx, cfg, port->runtime);
		return from_runtime(ctx, port->runtime);
	case NFX_PORT_FABRIC:
		return from_fabric(ctx, cfg);
	default:
		nfx_count(NFX_CNT_DROP_UNKNOWN_PORT);
		return XDP_DROP;
	}
}
