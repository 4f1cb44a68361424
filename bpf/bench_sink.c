/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmarks' sink (nfactor_xdp/tools/bench/load.py), attached to the
 * sink host's eth0 in place of its XDP_PASS program: counts every frame the
 * node delivers and drops it.  Counting in XDP keeps the sink far faster than
 * the node, so what it counts is what the node forwarded, not what a socket
 * on the sink could keep up with.
 */
#include <uapi/linux/bpf.h>

/* frames received, per CPU (summed by the reader) */
BPF_PERCPU_ARRAY(rx, u64, 1);

int sink(struct xdp_md *ctx)
{
	u32 zero = 0;
	u64 *c = rx.lookup(&zero);

	if (c)
		*c += 1;
	return XDP_DROP;
}
