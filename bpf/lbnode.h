/* lbnode: structs, maps and limits shared by the XDP program (lbnode.c) and mirrored in
 * Python by bpf/structs.py (a test checks sizes and field names against bcc's types).
 *
 * Addresses are stored in one 16-byte form: IPv6 as is, IPv4 as IPv4-mapped IPv6
 * (::ffff:a.b.c.d), so one key type serves both families. Multi-byte fields that come from the
 * wire stay in network byte order (__be*); everything else is host order.
 */
#ifndef LBNODE_H
#define LBNODE_H

#include <linux/types.h>

/* Limits; the loader may override any of them with -D. */
#ifndef MAX_SERVICES
#define MAX_SERVICES 256
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 4096
#endif
#ifndef CH_TABLE_BITS
#define CH_TABLE_BITS 12 /* slots per service table = 4096 */
#endif
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 262144
#endif
#ifndef EVENT_RING_PAGES
#define EVENT_RING_PAGES 256 /* 1 MiB: ~13k flow events between two user-space reads */
#endif
#ifndef IPV6_EXT_HEADERS_MAX
#define IPV6_EXT_HEADERS_MAX 4
#endif

#define CH_TABLE_SIZE (1u << CH_TABLE_BITS)
#define CH_TABLE_MASK (CH_TABLE_SIZE - 1)
/* Each service owns two tables; user space fills the idle one, then flips table_base. */
#define CH_TABLES_TOTAL (MAX_SERVICES * 2 * CH_TABLE_SIZE)
#define NO_BACKEND 0xffffffffu
#define FLOW_HASH_SEED 0x6c626e64u /* "lbnd"; bpf/flowhash.py uses the same */
/* Length of a new-pin window (lb_config.max_new_per_s_per_cpu), on the published clock. */
#define NEW_PIN_WINDOW_NS 1000000000

/* Flow table key: the 5-tuple as the client sent it. pad must be zero (it is hashed). */
struct flow_key {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* flow.flags */
#define FLOW_F_CLOSING 0x1 /* a FIN or RST was seen from the client */
#define FLOW_F_SYNCED 0x2  /* written by user space (learned from a peer), not pinned here */
/* ... and not forwarded here since: the program clears FLOW_F_SYNCED when it refreshes a flow's
 * last_seen_ns (the #define lines above are part of the pinned flow table's signature). */

/* Flow table value: the pinned backend, its service, and when the flow was last seen
 * (refreshed only when older than lb_config.refresh_ns, so established packets rarely write). */
struct flow {
	__u32 backend;
	__u16 service;      /* index of the service it belongs to */
	__u16 flags;
	__u64 last_seen_ns; /* lb_config.epoch_ns when pinned or last refreshed */
};

/* Service key: VIP, port, L4 protocol. */
struct service_key {
	__be32 vip[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* service.flags */
#define SERVICE_F_ACTIVE 0x1 /* cleared first when a service goes, so its flows stop matching */

/* Service by index: its active consistent-hash table. Pinned flows reach their service
 * through this array (cheap) instead of the services hash. */
struct service {
	__u32 table_base; /* first slot of the active table in ch_tables */
	__u32 flags;
};

/* backend.flags */
#define BACKEND_F_VALID 0x1 /* configured; flows pinned to an invalid backend are re-chosen */
#define BACKEND_F_UNRESOLVED 0x2 /* configured, MAC not known yet (a new backend, a node back from a
                                  * partition): its pinned flows are held (dropped, counted), not
                                  * re-chosen, so they survive until the MAC is learned */

/* Backend value: where to send its frames, and its address for flow events. */
struct backend {
	__be32 addr[4];
	__u8 mac[6];
	__u16 flags;
};

/* Global settings and the control plane's heartbeat (one entry). */
struct lb_config {
	__u8 mac[6]; /* source MAC of forwarded frames: the attached interface's */
	__u16 flags;
	__u64 refresh_ns; /* rewrite flow.last_seen_ns only when older than this */
	__u64 epoch_ns;   /* CLOCK_MONOTONIC ns, rewritten by user space every refresh_ns / 2 */
	__u32 max_new_per_s_per_cpu; /* new pins per CPU per NEW_PIN_WINDOW_NS; more are forwarded
	                              * by the table, unpinned and unreported. 0 = no cap */
	__u32 pad;
};

/* One CPU's new-pin window: when it started (lb_config.epoch_ns) and the pins made in it. */
struct pin_window {
	__u64 start_ns;
	__u32 pins;
	__u32 pad;
};

/* flow_event.kind */
#define EVENT_FLOW_NEW 1   /* pinned here: peers should install it */
#define EVENT_FLOW_CLOSE 2 /* first FIN/RST seen on a pinned flow */

/* Ring-buffer record: everything a peer needs to install or retire the flow. */
struct flow_event {
	struct flow_key key;
	__be32 backend_addr[4];
	__u32 backend;
	__u32 service;
	__u64 time_ns; /* lb_config.epoch_ns at the event */
	__u8 kind;
	__u8 pad[7];
};

/* Per-CPU counters of one service. */
struct service_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
	__u64 drops;
};

/* Per-CPU counters of one backend. new_flows - closed is what this node adds to the backend's
 * active connections between two maintenance walks, which recount them from the flow table
 * (weighting: leastconn sums it over the cluster; bpf/counters.py ActiveTally): closed counts a
 * pinned flow's first FIN or RST from the client (FLOW_F_CLOSING marks it, so once), here,
 * whichever node pinned it. */
struct backend_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
	__u64 closed;
};

/* Global verdict counters; every verdict lands in exactly one of the first six. */
enum lb_stat {
	STAT_PASS = 0,          /* not for a service */
	STAT_PASS_UNPARSED,     /* too short, malformed, or lengths that disagree with the frame or each
	                         * other: left to the kernel, never forwarded */
	STAT_PASS_NOT_OURS,     /* destination MAC not ours (flooded or promiscuous): left to the kernel */
	STAT_TX,                /* forwarded to a backend */
	STAT_DROP_NO_BACKEND,   /* service without a usable backend */
	STAT_DROP_FRAGMENT,     /* IP fragment to a VIP: no ports to hash (see README) */
	/* informational, not verdicts: */
	STAT_NEW_FLOW,          /* pinned here */
	STAT_SYN_UNPINNED,      /* a SYN of an unknown flow: forwarded, not pinned */
	STAT_ICMP_TOO_BIG,      /* ICMP frag-needed / ICMPv6 too-big forwarded to a flow's backend */
	STAT_FLOW_REPINNED,     /* pinned backend no longer valid: flow re-chosen */
	STAT_EVENT_LOST,        /* ring buffer full: a peer misses this flow event */
	STAT_DROP_UNRESOLVED,   /* pinned to a backend whose MAC is not known yet: held, not re-chosen */
	STAT_FLOOD_UNPINNED,    /* a new flow over this CPU's new-pin cap: forwarded by the table, not pinned */
	STAT_MAX,
};

#endif /* LBNODE_H */

/* ---- maps (bcc declarations; the program is the only translation unit) ---- */
#ifdef LBNODE_MAPS

/* VIP address key, for telling "fragment to a VIP" from other traffic. */
struct vip_key {
	__be32 addr[4];
};

/* (VIP, port, proto) -> service index. */
BPF_HASH(services, struct service_key, __u32, MAX_SERVICES);
/* Service index -> its table. */
BPF_ARRAY(service_slots, struct service, MAX_SERVICES);
/* Addresses that have at least one service; value = number of services. */
BPF_HASH(vips, struct vip_key, __u32, MAX_SERVICES);
/* Consistent-hash tables built in user space: slot -> backend index or NO_BACKEND. */
BPF_ARRAY(ch_tables, __u32, CH_TABLES_TOTAL);
/* Backend index -> where to send. */
BPF_ARRAY(backends, struct backend, MAX_BACKENDS);
/* Pinned flows; LRU so a full table evicts the least recently used, never fails an insert. */
BPF_TABLE("lru_hash", struct flow_key, struct flow, flows, FLOW_TABLE_SIZE);
/* Settings from the loader. */
BPF_ARRAY(config, struct lb_config, 1);
/* Counters, per CPU so the hot path never shares a cache line; user space sums them. */
BPF_PERCPU_ARRAY(service_stats, struct service_stats, MAX_SERVICES);
BPF_PERCPU_ARRAY(backend_stats, struct backend_stats, MAX_BACKENDS);
BPF_PERCPU_ARRAY(stats, __u64, STAT_MAX);
/* Each CPU's new-pin window, for lb_config.max_new_per_s_per_cpu. */
BPF_PERCPU_ARRAY(pin_windows, struct pin_window, 1);
/* New and closing flows, for flow sync. */
BPF_RINGBUF_OUTPUT(flow_events, EVENT_RING_PAGES);

#if defined(LB_BENCH_NEW_FLOW) || defined(LB_BENCH_SPREAD_BITS)
/* Benchmark builds only (bench/xdp.py): repetitions of one test-run frame so far, per CPU. */
BPF_PERCPU_ARRAY(bench_counter, __u64, 1);
#endif

#ifdef LBNODE_LAYOUT_CHECK
/* Compiled only by the layout test, so bcc generates a type for the ring-buffer record too. */
BPF_ARRAY(layout_flow_event, struct flow_event, 1);
#endif

#endif /* LBNODE_MAPS */
