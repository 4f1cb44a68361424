/* SPDX-License-Identifier: Apache-2.0 */
/*
 * XDP_PASS, attached by attach_pass() (nfactor_xdp/kern/loader.py) to the
 * testbed hosts' eth0 and to be attached to any veth a user puts on the
 * node's external ports.  It passes every frame up the stack unchanged; its
 * only purpose is that a veth with an XDP program has NAPI.  Frames the node
 * XDP-redirects into a veth are received by the peer only if the peer has
 * NAPI; without it they vanish (err -95, visible only to bpf/tracer.c)
 * after bpf_redirect_map() returned success.  GRO on the peer gives a veth
 * NAPI on some kernels, but not on the ones this project runs on.
 */
#include <uapi/linux/bpf.h>

int nfx_host_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
