/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Makes failed redirects visible.  bpf_redirect_map() returns XDP_REDIRECT
 * even when the kernel later cannot deliver the frame (a veth peer without
 * NAPI, a full ring): the frame is gone and no counter of ours moved.  These
 * tracepoints are the only witness, so count them.
 */
#include <uapi/linux/bpf.h>

#include "nfactor_maps.h"

static __always_inline int our_prog(int prog_id)
{
	__u32 zero = 0;
	struct nfx_config *cfg = config.lookup(&zero);

	if (!cfg || prog_id == 0)
		return 0;
	return (__u32)prog_id == (__u32)cfg->prog_ids || (__u32)prog_id == (__u32)(cfg->prog_ids >> 32);
}

TRACEPOINT_PROBE(xdp, xdp_redirect_err)
{
	__u32 i = NFX_CNT_REDIRECT_ERR;
	__u64 *c;

	if (!our_prog(args->prog_id))
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
