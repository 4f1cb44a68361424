/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Attached to the runtime-side end of every runtime port (rtN): hands each
 * frame to that runtime's AF_XDP socket.  An AF_XDP socket only receives
 * frames that arrived on the device and queue it is bound to, which is why
 * the switch steers by device (devmap to sw-rtN) and not straight into a
 * socket.  No socket registered (runtime starting or dead): drop and count.
 */
#include <uapi/linux/bpf.h>

#include "nfactor_maps.h"

/* runtime id -> its AF_XDP socket, bound to queue 0 of rtN */
BPF_XSKMAP(xsks, NFX_MAX_RUNTIMES, NFX_PIN("xsks"));

static __always_inline void nfx_count(__u32 idx)
{
	__u64 *c = counters.lookup(&idx);

	if (c)
		*c += 1;
}

int nfx_steer(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex, rt;
	struct nfx_port *port = ports.lookup(&ifindex);
	struct nfx_rt_stats *st;
	int act;

	if (!port || port->role != NFX_PORT_STEER || port->runtime >= NFX_MAX_RUNTIMES) {
		nfx_count(NFX_CNT_DROP_UNKNOWN_PORT);
		return XDP_DROP;
	}
	rt = port->runtime;
	act = xsks.redirect_map(rt, XDP_DROP);
	st = rt_stats.lookup(&rt);
	if (st) {
		if (act == XDP_REDIRECT)
			st->to_socket++;
		else
			st->no_socket++;
	}
	return act;
}
