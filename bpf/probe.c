/* SPDX-License-Identifier: Apache-2.0 */
/*
 * `nfactorctl probe` (nfactor_xdp/tools/probe.py): one XDP program that
 * uses every kind of map and redirect the node's programs use (xskmap,
 * devmap, LRU hash, per-CPU array).  If this compiles, loads, test-runs,
 * attaches natively to a veth and takes an AF_XDP socket, the kernel and BCC
 * have what the node needs; if not, the error says which part is missing.
 * The queue indexes 7 and 8 never occur in the probe's test run: the
 * redirects are there to be verified, not taken.
 */
#include <uapi/linux/bpf.h>

BPF_XSKMAP(xsks, 4);
BPF_DEVMAP(txp, 4);
BPF_TABLE("lru_hash", u32, u64, lru, 16);
BPF_PERCPU_ARRAY(cnt, u64, 1);

int probe(struct xdp_md *ctx)
{
	u32 k = 0;
	u64 one = 1;
	u64 *c;

	lru.update(&k, &one);
	c = cnt.lookup(&k);
	if (c)
		*c += 1;
	if (ctx->rx_queue_index == 7)
		return xsks.redirect_map(0, XDP_DROP);
	if (ctx->rx_queue_index == 8)
		return txp.redirect_map(0, XDP_DROP);
	return XDP_PASS;
}
