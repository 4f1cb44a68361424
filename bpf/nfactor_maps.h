/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The node's maps, pinned under NFX_PIN_DIR (set by the loader, one directory
 * per node).  BCC reuses a pin that exists and creates it otherwise, so a
 * reloaded program or a restarted agent finds every flow where it was.
 * Included by each program that needs them; BCC-specific declarations.
 * BCC rewrites map method calls (m.lookup()) only in the main source file, so
 * headers declare maps but never use them.
 */
#ifndef NFACTOR_MAPS_H
#define NFACTOR_MAPS_H

#include "nfactor_shared.h"

#ifndef NFX_PIN_DIR
#error "NFX_PIN_DIR must be defined by the loader"
#endif
#ifndef NFX_FLOW_TABLE_SIZE
#define NFX_FLOW_TABLE_SIZE 262144
#endif

#define NFX_PIN(name) NFX_PIN_DIR "/" name
/* BPF_F_MMAPABLE (uapi bpf.h), spelled out: not every header set has it */
#define NFX_F_MMAPABLE (1 << 10)

/* ifindex -> role of that port */
BPF_TABLE_PINNED("hash", __u32, struct nfx_port, ports, NFX_MAX_PORTS, NFX_PIN("ports"));
/* runtime id -> state and switch-side ifindex */
BPF_TABLE_PINNED("array", __u32, struct nfx_runtime, runtimes, NFX_MAX_RUNTIMES, NFX_PIN("runtimes"));
/* host id -> fabric address (nfactor_shared.h, "Hosts") */
BPF_TABLE_PINNED("array", __u32, struct nfx_host, hosts, NFX_MAX_HOSTS, NFX_PIN("hosts"));
/* key 0: the running runtimes in round-robin order */
BPF_TABLE_PINNED("array", __u32, struct nfx_rr_table, rr_table, 1, NFX_PIN("rr_table"));
/* key 0: node configuration */
BPF_TABLE_PINNED("array", __u32, struct nfx_config, config, 1, NFX_PIN("config"));
/* canonical 5-tuple -> owning runtime (paper 3.2 switching table) */
BPF_TABLE_PINNED("lru_hash", struct nfx_flow_key, struct nfx_flow, flows, NFX_FLOW_TABLE_SIZE, NFX_PIN("flows"));
/* verdict and drop-reason counters */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, counters, NFX_CNT_MAX, NFX_PIN("counters"));
/* offloaded flows' slots (struct nfx_offload), mmap-ed and written in place
 * by their runtimes (nfactor_xdp/kern/offloads.py) */
BPF_TABLE_PINNED("array", __u32, struct nfx_offload, offloads, NFX_MAX_OFFLOADS, NFX_PIN("offloads"), NFX_F_MMAPABLE);
/* runtime id -> its observe ring (a BPF ring buffer it creates and puts here;
 * nfactor_xdp/kern/observe.py).  The template only gives the inner maps' type
 * and size. */
BPF_RINGBUF_OUTPUT(observe_ring_template, NFX_OBSERVE_RING_BYTES / 4096);
BPF_TABLE_PINNED("array_of_maps$observe_ring_template", __u32, __u32, observers, NFX_MAX_RUNTIMES,
		 NFX_PIN("observers"));
/* per-runtime traffic */
BPF_TABLE_PINNED("percpu_array", __u32, struct nfx_rt_stats, rt_stats, NFX_MAX_RUNTIMES, NFX_PIN("rt_stats"));

#endif /* NFACTOR_MAPS_H */
