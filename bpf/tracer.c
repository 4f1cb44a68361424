/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Makes failed redirects visible.  bpf_redirect_map() returns XDP_REDIRECT
 * even when the kernel later cannot deliver the frame (a veth peer without
 * NAPI, a full ring): the frame is gone and no counter of ours moved.  These
 * tracepoints are the only witness, so count them.
 */
#include <uapi/linux/bpf.h>

#include "nfactor_maps.h"

/* Which counter a failed redirect of program prog_id goes to; 0: not ours. */
static __always_inline __u32 counter_of(int prog_id)
{
	__u32 zero = 0;
	struct nfx_config *cfg = config.lookup(&zero);

	if (!cfg || prog_id == 0)
		return 0;
	if ((__u32)prog_id == (__u32)cfg->prog_ids)
		return NFX_CNT_REDIRECT_ERR;
	if ((__u32)prog_id == (__u32)(cfg->prog_ids >> 32))
		return NFX_CNT_SOCKET_FULL;
	return 0;
}

TRACEPOINT_PROBE(xdp, xdp_redirect_err)
{
	__u32 i = counter_of(args->prog_id);
	__u64 *c;

	if (!i)
		return 0;
	c = counters.lookup(&i);
	if (c)
		*c += 1;
	return 0;
}

TRACEPOINT_PROBE(xdp, xdp_devmap_xmit)
{
	__u32 from = args->from_ifindex, i;
	struct nfx_port *port = ports.lookup(&from);
	__u64 *c;

	if (!port || args->drops <= 0)
		return 0;
	i = NFX_CNT_XMIT_DROP;
	c = counters.lookup(&i);
	if (c)
		*c += args->drops;
	return 0;
}
