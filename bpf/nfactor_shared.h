/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Everything the XDP programs and the Python side both need to agree on: map
 * keys and values, constants, counter indexes.  It is declared here once; the
 * Python package reads its layouts from this file (nfactor_xdp/layouts.py), so
 * keep to the subset that parser understands: #define NAME <integer expr>,
 * enums with explicit or implicit values, structs of __u8/__u16/__u32/__u64
 * scalars and fixed arrays of them.  Every struct is padded by hand so that C
 * and Python agree without relying on compiler padding.
 */
#ifndef NFACTOR_SHARED_H
#define NFACTOR_SHARED_H

/* Bump when a pinned map's key or value changes: a node refuses to reuse
 * pinned maps written by another ABI. */
#define NFX_ABI_VERSION 5

#define NFX_MAX_RUNTIMES 64
/* devmap slots: the two external ports, then one per runtime port */
#define NFX_SLOT_EXT0 0
#define NFX_SLOT_EXT1 1
#define NFX_SLOT_RT_BASE 2
/* the port towards the other hosts (docs/architecture.md, "Hosts") */
#define NFX_SLOT_FABRIC (NFX_SLOT_RT_BASE + NFX_MAX_RUNTIMES)
#define NFX_DEVMAP_SIZE (NFX_SLOT_FABRIC + 1)
#define NFX_MAX_PORTS 256
#define NFX_MAX_IPV6_EXT 6
/* offloads array: each runtime owns an equal range of slots, runtime r the
 * slots [r * NFX_OFFLOADS_PER_RUNTIME, (r + 1) * NFX_OFFLOADS_PER_RUNTIME) */
#define NFX_MAX_OFFLOADS 65536
#define NFX_OFFLOADS_PER_RUNTIME (NFX_MAX_OFFLOADS / NFX_MAX_RUNTIMES)
/* bucket tokens are nanotokens: a rate in tokens per second refills that many per ns */
#define NFX_NANOTOKENS 1000000000

/* The ingress tag: the switch puts one byte in front of every frame it sends
 * to a runtime, NFX_INGRESS_TAG | the external port (0/1) it came in on.
 * Runtimes parse the frame behind it; a runtime sends frames back with it,
 * and the switch sends each out of the other external port, tag removed.  So
 * a frame's egress depends on its own ingress only.  In front, not behind:
 * XDP guarantees headroom (XDP_PACKET_HEADROOM) but not tailroom, and on a
 * veth some frames have none. */
#define NFX_INGRESS_TAG_LEN 1
#define NFX_INGRESS_TAG 0xA8
#define NFX_INGRESS_PORT_MASK 1

/* What a port of the node is (ports map: ifindex -> struct nfx_port). */
enum nfx_port_role {
	NFX_PORT_NONE = 0,
	NFX_PORT_EXT0 = 1,	/* external port 0 (towards the sources) */
	NFX_PORT_EXT1 = 2,	/* external port 1 (towards the sinks) */
	NFX_PORT_RUNTIME = 3,	/* switch-side end of a runtime's veth (sw-rtN) */
	NFX_PORT_STEER = 4,	/* runtime-side end (rtN), carries the AF_XDP socket */
	NFX_PORT_FABRIC = 5,	/* the link to the node's other hosts */
};

/*
 * Hosts.  A node may span an ingress host (host 0: the external ports, the
 * flow table) and worker hosts (1..) that only run runtimes.  The switch
 * sends a frame owned by a runtime on another host over the fabric inside
 * outer Ethernet, IPv4 (DF, no options) and UDP headers and a struct
 * nfx_fabric_hdr, NFX_FABRIC_ENCAP_LEN bytes in all.  The header's last byte
 * is the ingress tag, so stripping NFX_FABRIC_ENCAP_LEN - NFX_INGRESS_TAG_LEN
 * bytes leaves the [tag][frame] a local runtime gets; frames coming back are
 * wrapped the same way towards host 0.  Runtime r of a node with hosts lives
 * on host r / NFX_RUNTIMES_PER_HOST.
 */
#define NFX_MAX_HOSTS 8
#define NFX_RUNTIMES_PER_HOST (NFX_MAX_RUNTIMES / NFX_MAX_HOSTS)
#define NFX_FABRIC_UDP_PORT 6635	/* destination port of encapsulated frames */
#define NFX_FABRIC_SRC_PORT 6636	/* source port: this + the runtime id (one RSS queue per runtime) */
#define NFX_FABRIC_MAGIC 0x4E
#define NFX_FABRIC_VERSION 1
#define NFX_FABRIC_ENCAP_LEN 46

struct nfx_fabric_hdr {
	__u8 magic;		/* NFX_FABRIC_MAGIC */
	__u8 version;		/* NFX_FABRIC_VERSION */
	__u8 runtime;		/* the runtime the frame goes to or comes from */
	__u8 tag;		/* the ingress tag */
};

enum nfx_host_flags {
	NFX_HOST_KNOWN = 1,	/* address and MAC filled in: frames may go to it */
	NFX_HOST_FENCED = 2,	/* failed: whatever it still sends is dropped */
};

/* hosts map: host id -> its fabric address (host 0 is the ingress).  Each
 * host's own entry is its own address, config.host_id says which it is. */
struct nfx_host {
	__u8 mac[6];
	__u8 flags;		/* enum nfx_host_flags */
	__u8 pad;
	__u8 ipv4[4];		/* network order */
	__u32 pad2;
};

/* A runtime's state as the switch sees it (paper 3.1 view service). */
enum nfx_rt_state {
	NFX_RT_NONE = 0,	/* slot unused: flows placed here are re-placed */
	NFX_RT_STARTING = 1,	/* keeps its flows, gets no new ones */
	NFX_RT_RUNNING = 2,	/* keeps its flows and takes new ones */
	NFX_RT_LEAVING = 3,	/* keeps its flows, gets no new ones */
	NFX_RT_FAILED = 4,	/* keeps its flows (recovery brings them back) */
};

/* How traffic that is not a flow is treated (ARP, ICMP, non-IP). */
enum nfx_other_action {
	NFX_OTHER_FORWARD = 0,	/* out of the opposite external port, untouched */
	NFX_OTHER_PASS = 1,	/* to the node's own network stack */
	NFX_OTHER_DROP = 2,
};

enum nfx_switch_mode {
	NFX_MODE_FLOWS = 0,	/* normal: flows go through the runtimes */
	NFX_MODE_BYPASS = 1,	/* everything ext0<->ext1 in XDP (ceiling, diagnosis) */
	NFX_MODE_LOOKUP = 2,	/* flows parsed, looked up, placed, then ext0<->ext1 (ceiling with the switch's work) */
};

struct nfx_port {
	__u32 role;		/* enum nfx_port_role */
	__u32 runtime;		/* runtime id for RUNTIME and STEER ports */
};

struct nfx_runtime {
	__u32 state;		/* enum nfx_rt_state */
	__u32 ifindex;		/* the switch-side port sw-rtN (0 on another host) */
	__u32 host;		/* the host it runs on (0: the ingress host) */
	__u32 pad;
};

/* The running runtimes, in round-robin order; one value at key 0.  Userspace
 * rewrites it whenever a runtime changes state. */
struct nfx_rr_table {
	__u32 count;
	__u32 pad;
	__u32 ids[NFX_MAX_RUNTIMES];
};

/*
 * Canonical flow key: the endpoint (address, port) that compares lower goes
 * first, so both directions of a connection share one entry.  IPv4 addresses
 * are stored IPv4-mapped (::ffff:a.b.c.d).  Ports and VLAN ids in network
 * byte order.  Fragments and IP protocols other than TCP/UDP key on the
 * addresses, protocol and VLANs only (ports 0): every fragment of a host pair
 * reaches the same runtime.  VLAN ids are 0 when untagged, so a frame with a
 * VID-0 (priority) tag names the same flow as an untagged one.
 */
struct nfx_flow_key {
	__u8 lo_addr[16];
	__u8 hi_addr[16];
	__u16 lo_port;
	__u16 hi_port;
	__u8 proto;
	__u8 pad[3];
	__u16 vlan_outer;	/* VID of the outer tag (802.1Q or 802.1ad), 0: none */
	__u16 vlan_inner;	/* VID of the inner 802.1Q tag, 0: none */
};

/* Where a flow is placed.  Nothing here decides where a frame leaves: each
 * frame carries its own ingress (the ingress tag). */
struct nfx_flow {
	__u32 runtime;
	__u8 orig_dir;		/* 0: the placing frame went lo -> hi, 1: hi -> lo (shown only) */
	__u8 pad[3];
	__u64 created_ns;	/* bpf_ktime_get_ns() at placement */
	__u32 offload;		/* 0: none, else the offloads slot index + 1 (set by the runtime) */
	__u32 pad2;
};

/* What the switch does with an offloaded flow's frames. */
enum nfx_offload_action {
	NFX_OFF_NONE = 0,	/* not offloaded (or revoked): frames go to the runtime */
	NFX_OFF_FORWARD = 1,	/* out of the opposite external port, subject to the buckets */
	NFX_OFF_DROP = 2,	/* dropped */
};

/* Observe mode: which forwarded frames of a FORWARD slot are also copied to
 * the owning runtime's observe ring (its NFs that only observe see them). */
enum nfx_observe {
	NFX_OBSERVE_NONE = 0,
	NFX_OBSERVE_ALL = 1,		/* every forwarded frame */
	NFX_OBSERVE_PAYLOAD = 2,	/* only TCP/UDP frames with payload bytes */
};

/*
 * A copy in a runtime's observe ring (a BPF ring buffer, one per runtime, in
 * the observers map): this header, then the first `len` bytes of the frame
 * (no ingress tag).  Frames longer than NFX_COPY_MAX are not copied (counted
 * as observation losses).  Records of small frames reserve NFX_COPY_SMALL
 * bytes, the others NFX_COPY_MAX: the ring's reservations take constant sizes.
 */
struct nfx_copy {
	__u32 slot;		/* the offloads slot that made the copy */
	__u16 len;		/* frame bytes that follow */
	__u8 dir;		/* canonical direction: 0 lo -> hi, 1 hi -> lo */
	__u8 pad;
};
#define NFX_COPY_SMALL 248
#define NFX_COPY_MAX 1536
#define NFX_OBSERVE_RING_BYTES (4 << 20)	/* per runtime; a power of 2 pages */

/*
 * One slot of the offloads array (pinned, mmap-ed by the owning runtime,
 * which writes the parameters first and the action last, and revokes by
 * clearing the action in place).  Arrays of two are per canonical direction:
 * [0] lo -> hi, [1] hi -> lo (the flow key's order, not the first frame's).
 * packets and bytes count every frame the slot handled (forwarded, dropped by
 * the action or by a bucket; punted frames are not counted: the runtime sees
 * them); bytes are Ethernet frame lengths.  The buckets are off when their
 * rate is 0; tokens are nanotokens (NFX_NANOTOKENS per token or byte), the
 * rates whole tokens per second (32 bits), and stamp_ns (bpf_ktime_get_ns(),
 * i.e. CLOCK_MONOTONIC) the last refill of both.  160 bytes.
 */
struct nfx_offload {
	__u32 action;		/* enum nfx_offload_action; the owner writes it last */
	__u32 runtime;		/* the owning runtime: a flow on another runtime ignores the slot */
	__u8 punt_tcp_flags;	/* TCP frames with any of these flags go to the runtime (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10) */
	__u8 observe;		/* enum nfx_observe (FORWARD only) */
	__u8 pad[6];
	__u64 packets[2];
	__u64 bytes[2];
	__u64 bucket_dropped[2];	/* FORWARD frames a bucket dropped (also in packets and bytes) */
	__u64 bucket_dropped_bytes[2];	/* their bytes */
	__u64 last_seen_ns;	/* bpf_ktime_get_ns() of the last frame handled */
	__u32 pps;		/* packet bucket: packets per second, 0: no packet bucket */
	__u32 burst;		/* its size in packets */
	__u32 bps;		/* byte bucket: bytes per second, 0: no byte bucket */
	__u32 byte_burst;	/* its size in bytes */
	__u64 tokens;		/* packet bucket's nanotokens */
	__u64 btokens;		/* byte bucket's nanotokens (nano-bytes) */
	__u64 stamp_ns;		/* last refill of both buckets */
	__u64 observed[2];	/* forwarded frames copied to the observe ring */
	__u64 observe_lost[2];	/* forwarded frames that should have been copied but the ring had no room (or no ring) */
};

struct nfx_config {
	__u32 abi;		/* NFX_ABI_VERSION of whoever wrote the pins */
	__u32 other_action;	/* enum nfx_other_action */
	__u32 mode;		/* enum nfx_switch_mode */
	__u32 host_id;		/* which host this is (0: the ingress) */
	__u64 prog_ids;		/* vswitch prog id (low 32) and steer prog id (high 32), for the error tracer */
};

/* Per-runtime traffic as the switch sees it (per-CPU array, index = runtime id). */
struct nfx_rt_stats {
	__u64 to_rt_packets;
	__u64 to_rt_bytes;
	__u64 from_rt_packets;
	__u64 from_rt_bytes;
	__u64 flows_placed;
	__u64 to_socket;	/* steer: frames redirected into the runtime's AF_XDP socket */
	__u64 no_socket;	/* steer: dropped, no socket registered (runtime down or starting) */
	__u64 pad;
};

/* Switch verdicts and drop reasons (per-CPU array, index = counter). */
enum nfx_counter {
	NFX_CNT_RX_EXT = 0,		/* frames received on an external port */
	NFX_CNT_RX_RUNTIME,		/* frames received back from a runtime port */
	NFX_CNT_FLOW_NEW,		/* new flows placed on a runtime */
	NFX_CNT_FLOW_RACE,		/* new-flow insert lost to another CPU; its placement was used */
	NFX_CNT_FLOW_REPLACED,		/* flows re-placed because their runtime slot was empty */
	NFX_CNT_TO_RUNTIME,		/* frames redirected to a runtime port */
	NFX_CNT_TO_EXT,			/* frames from runtimes redirected to the egress external port */
	NFX_CNT_OTHER_FORWARD,		/* non-flow frames forwarded to the opposite external port */
	NFX_CNT_OTHER_PASS,		/* non-flow frames passed to the node's stack */
	NFX_CNT_OTHER_DROP,		/* non-flow frames dropped by policy */
	NFX_CNT_BYPASS,			/* frames forwarded ext<->ext in bypass or lookup mode */
	NFX_CNT_CLS_ARP,		/* classified: ARP */
	NFX_CNT_CLS_ICMP,		/* classified: ICMP or ICMPv6 */
	NFX_CNT_CLS_VLAN,		/* classified: one or two VLAN tags (802.1Q/802.1ad), parsed through */
	NFX_CNT_CLS_NON_IP,		/* classified: other ethertype */
	NFX_CNT_CLS_OTHER_PROTO,	/* classified: IP protocol other than TCP/UDP/ICMP (a flow keyed without ports) */
	NFX_CNT_CLS_FRAGMENT,		/* classified: IP fragment (keyed without ports) */
	NFX_CNT_CLS_IP_OPTIONS,		/* classified: IPv4 with options */
	NFX_CNT_CLS_IPV6_EXT,		/* classified: IPv6 with extension headers */
	NFX_CNT_DROP_SHORT_ETH,		/* dropped: shorter than an Ethernet header and its VLAN tags */
	NFX_CNT_DROP_BAD_IP,		/* dropped: truncated IP header, bad IHL, version or lengths */
	NFX_CNT_DROP_BAD_L4,		/* dropped: truncated TCP/UDP header or bad TCP data offset */
	NFX_CNT_DROP_BAD_IPV6_EXT,	/* dropped: truncated or too long IPv6 extension chain */
	NFX_CNT_DROP_VLAN_DEEP,		/* dropped: more than two VLAN tags, or 802.1ad inside a tag (hosts take VID-0 stacks as untagged) */
	NFX_CNT_DROP_NO_RUNTIME,	/* dropped: new flow but no runtime is running */
	NFX_CNT_DROP_MAP_FULL,		/* dropped: flow table insert failed */
	NFX_CNT_DROP_NO_HEADROOM,	/* dropped: no room to put the ingress tag in front of a frame for a runtime */
	NFX_CNT_DROP_RT_NO_TAG,		/* dropped: frame from a runtime without a valid ingress tag */
	NFX_CNT_DROP_UNKNOWN_PORT,	/* dropped: frame on a port with no role */
	NFX_CNT_DROP_NO_PORT,		/* dropped: redirect target slot has no device */
	NFX_CNT_REDIRECT_ERR,		/* switch redirects the kernel failed after the program returned (tracer) */
	NFX_CNT_SOCKET_FULL,		/* frames a runtime's AF_XDP socket could not take: RX ring full (tracer) */
	NFX_CNT_XMIT_DROP,		/* frames a target port dropped on redirected transmit (tracer) */
	NFX_CNT_OFF_FORWARD,		/* offloaded flows' frames forwarded to the opposite external port */
	NFX_CNT_OFF_DROP,		/* offloaded flows' frames dropped by a DROP offload */
	NFX_CNT_OFF_BUCKET_DROP,	/* offloaded flows' frames dropped by the offload's token bucket */
	NFX_CNT_OFF_PUNT,		/* offloaded flows' TCP frames sent to the runtime for a flag in the punt mask */
	NFX_CNT_OFF_STALE,		/* frames whose flow names a slot that is revoked or another runtime's: to the runtime */
	NFX_CNT_OFF_OBSERVED,		/* offloaded flows' forwarded frames copied to their runtime's observe ring */
	NFX_CNT_OFF_OBSERVE_LOST,	/* ... that could not be copied: the ring was full or missing (the frame was still forwarded) */
	NFX_CNT_TO_FABRIC,		/* frames sent encapsulated to another host */
	NFX_CNT_RX_FABRIC,		/* encapsulated frames from another host, accepted */
	NFX_CNT_FABRIC_PASS,		/* fabric frames not encapsulated for this host: to its stack (control, ARP) */
	NFX_CNT_DROP_FABRIC_BAD,	/* dropped: encapsulated for this host but malformed (header, lengths, fragment) */
	NFX_CNT_DROP_FABRIC_RUNTIME,	/* dropped: names a runtime that does not exist, is not local (worker) or not on the sending host (ingress) */
	NFX_CNT_DROP_FABRIC_FENCED,	/* dropped: from a host fenced as failed */
	NFX_CNT_DROP_NO_HOST,		/* dropped: for a runtime on a host whose address is not known */
	NFX_CNT_MAX,
};

#endif /* NFACTOR_SHARED_H */
