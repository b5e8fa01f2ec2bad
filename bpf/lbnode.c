/* lbnode XDP program: layer-2 direct server return.
 *
 * Theory of operation. A frame to (VIP, port, proto) of a configured service is sent to a
 * backend by rewriting its MACs (destination = backend, source = us) and XDP_TX; the backend
 * holds the VIP on loopback and answers the client directly. Everything else is XDP_PASS.
 *
 * Backend choice: a pinned flow (LRU flow table, keyed by the 5-tuple) always wins; otherwise
 * the service's consistent-hash table, built in user space, is indexed by a hash of the 5-tuple.
 *
 * Pinning policy (what keeps a SYN flood from evicting established flows and from flooding flow
 * sync): a TCP flow is pinned at its first packet that is neither a bare SYN nor an RST, i.e.
 * at the handshake's ACK, or at any mid-flow packet of a flow that moved here from another
 * node. Bare SYNs are forwarded by the table alone. UDP flows are pinned at their first packet.
 * Each pin is reported on the flow_events ring buffer; so is the first FIN/RST of a pinned flow.
 * A flood of new flows that are pinned (spoofed UDP, mid-flow ACKs) is capped per CPU
 * (lb_config.max_new_per_s_per_cpu pins per NEW_PIN_WINDOW_NS, like Katran's LRU bypass above
 * MAX_CONN_RATE per core): above the cap a new flow is forwarded by the table alone, like a
 * SYN, neither pinned nor reported, and counted (STAT_FLOOD_UNPINNED).
 *
 * Malformed frames: the IP length fields are checked against the frame and every header inside
 * against them (see "Length checks"); a frame that fails is passed to the kernel, never forwarded.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#define LBNODE_MAPS
#include "lbnode.h"
#include "flowhash.h"

/* What the parser found. */
enum parse_result {
	PARSE_OK,        /* TCP/UDP (or ICMP too-big about one) with a full key */
	PARSE_NOT_OURS,  /* another protocol: never a service */
	PARSE_UNPARSED,  /* truncated or malformed */
	PARSE_FRAGMENT,  /* IP fragment: addresses known, ports not */
};

struct packet {
	struct flow_key key;
	__u8 tcp_flags;    /* TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u8 icmp_too_big; /* key was taken from the header quoted in an ICMP too-big */
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define TCP_FLAGS_OFFSET 13

static __always_inline void count(__u32 stat)
{
	__u64 *value = stats.lookup(&stat);
	if (value)
		*value += 1;
}

static __always_inline int verdict(__u32 stat, int action)
{
	count(stat);
	return action;
}

static __always_inline void ipv4_to_16(__be32 *out, __be32 addr)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0xffff);
	out[3] = addr;
}

/* Length checks. The IP layer's length field is checked against the frame first (the datagram
 * must fit; bytes after it are an Ethernet trailer and are forwarded unchanged), then every
 * header inside is checked against the datagram: l4_len is the number of bytes the IP length
 * field leaves after the IP (and IPv6 extension) headers. Pointer checks against data_end stay
 * for the verifier. Anything that fails is PARSE_UNPARSED: passed to the kernel, never forwarded. */

/* TCP or UDP ports (and TCP flags) at l4, whose datagram leaves l4_len bytes for them. */
static __always_inline int parse_ports(void *l4, __u32 l4_len, void *data_end, struct packet *pkt)
{
	if (pkt->key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return PARSE_UNPARSED;
		__u32 doff = tcp->doff * 4; /* header with options */
		if (doff < sizeof(*tcp) || doff > l4_len || l4 + doff > data_end)
			return PARSE_UNPARSED;
		pkt->key.sport = tcp->source;
		pkt->key.dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
		return PARSE_OK;
	}
	if (pkt->key.proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return PARSE_UNPARSED;
		__u32 ulen = bpf_ntohs(udp->len); /* shorter than l4_len: the rest is IP padding */
		if (ulen < sizeof(*udp) || ulen > l4_len)
			return PARSE_UNPARSED;
		pkt->key.sport = udp->source;
		pkt->key.dport = udp->dest;
		return PARSE_OK;
	}
	return PARSE_NOT_OURS;
}

/* The quoted header's first 4 L4 bytes are its ports: the flow is the reverse of the quote.
 * quoted is how many bytes of the ICMP message precede them. */
static __always_inline int key_from_quote(void *ports, __u32 quoted, __u32 l4_len, void *data_end,
					  __u8 proto, struct packet *pkt)
{
	__be16 *p = ports;
	if ((void *)(p + 2) > data_end || quoted + 4 > l4_len)
		return PARSE_UNPARSED;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	pkt->key.proto = proto;
	pkt->key.sport = p[1];
	pkt->key.dport = p[0];
	pkt->icmp_too_big = 1;
	return PARSE_OK;
}

/* ICMP "fragmentation needed" about a packet a backend sent from a VIP. */
static __always_inline int parse_icmp4(void *l4, __u32 l4_len, void *data_end, struct packet *pkt)
{
	struct icmphdr *icmp = l4;
	if ((void *)(icmp + 1) > data_end)
		return PARSE_UNPARSED;
	if (icmp->type != ICMP_DEST_UNREACH || icmp->code != ICMP_FRAG_NEEDED)
		return PARSE_NOT_OURS;
	struct iphdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > data_end)
		return PARSE_UNPARSED;
	__u32 ihl = inner->ihl;
	if (inner->version != 4 || ihl < 5)
		return PARSE_UNPARSED;
	/* The ICMP went to the VIP that sent the quoted packet. */
	if (inner->saddr != pkt->key.dst[3])
		return PARSE_NOT_OURS;
	/* A later fragment's payload is data, not an L4 header: there are no ports to read. */
	if (inner->frag_off & bpf_htons(0x1fff))
		return PARSE_NOT_OURS;
	ipv4_to_16(pkt->key.src, inner->daddr);
	return key_from_quote((void *)inner + ihl * 4, sizeof(*icmp) + ihl * 4, l4_len, data_end,
			      inner->protocol, pkt);
}

static __always_inline int parse_ipv4(void *l3, void *data_end, struct packet *pkt)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > data_end)
		return PARSE_UNPARSED;
	__u32 ihl = ip->ihl;
	if (ip->version != 4 || ihl < 5)
		return PARSE_UNPARSED;
	__u32 hlen = ihl * 4;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < hlen || l3 + tot_len > data_end)
		return PARSE_UNPARSED;
	void *l4 = l3 + hlen;
	__u32 l4_len = tot_len - hlen;
	ipv4_to_16(pkt->key.src, ip->saddr);
	ipv4_to_16(pkt->key.dst, ip->daddr);
	pkt->key.proto = ip->protocol;
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or a fragment offset */
		return PARSE_FRAGMENT;
	if (ip->protocol == IPPROTO_ICMP)
		return parse_icmp4(l4, l4_len, data_end, pkt);
	return parse_ports(l4, l4_len, data_end, pkt);
}

/* ICMPv6 "packet too big" about a packet a backend sent from a VIP. A quoted fragment (or any
 * extension header) is never read as ports: only a quote whose next header is TCP/UDP is. */
static __always_inline int parse_icmp6(void *l4, __u32 l4_len, void *data_end, struct packet *pkt)
{
	struct icmp6hdr *icmp = l4;
	if ((void *)(icmp + 1) > data_end)
		return PARSE_UNPARSED;
	if (icmp->icmp6_type != ICMPV6_PKT_TOOBIG)
		return PARSE_NOT_OURS;
	struct ipv6hdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > data_end)
		return PARSE_UNPARSED;
	__be32 *quoted_src = (__be32 *)&inner->saddr;
	if (quoted_src[0] != pkt->key.dst[0] || quoted_src[1] != pkt->key.dst[1] ||
	    quoted_src[2] != pkt->key.dst[2] || quoted_src[3] != pkt->key.dst[3])
		return PARSE_NOT_OURS;
	__builtin_memcpy(pkt->key.src, &inner->daddr, 16);
	return key_from_quote(inner + 1, sizeof(*icmp) + sizeof(*inner), l4_len, data_end, inner->nexthdr, pkt);
}

static __always_inline int parse_ipv6(void *l3, void *data_end, struct packet *pkt)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > data_end)
		return PARSE_UNPARSED;
	if (ip6->version != 6)
		return PARSE_UNPARSED;
	__u32 payload_len = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + payload_len > data_end)
		return PARSE_UNPARSED;
	__builtin_memcpy(pkt->key.src, &ip6->saddr, 16);
	__builtin_memcpy(pkt->key.dst, &ip6->daddr, 16);
	__u8 nexthdr = ip6->nexthdr;
	void *l4 = ip6 + 1;
	__u32 ext_len = 0; /* extension headers walked, in bytes */
#pragma unroll
	for (int i = 0; i < IPV6_EXT_HEADERS_MAX; i++) {
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING && nexthdr != IPPROTO_DSTOPTS)
			break;
		struct ipv6_opt_hdr *opt = l4;
		if ((void *)(opt + 1) > data_end)
			return PARSE_UNPARSED;
		nexthdr = opt->nexthdr;
		__u32 len = (opt->hdrlen + 1) * 8;
		l4 += len;
		ext_len += len;
	}
	if (ext_len > payload_len)
		return PARSE_UNPARSED; /* an extension header runs past the payload */
	__u32 l4_len = payload_len - ext_len;
	pkt->key.proto = nexthdr;
	if (nexthdr == IPPROTO_FRAGMENT)
		return PARSE_FRAGMENT;
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS)
		return PARSE_UNPARSED; /* more extension headers than we walk */
	if (nexthdr == IPPROTO_ICMPV6)
		return parse_icmp6(l4, l4_len, data_end, pkt);
	return parse_ports(l4, l4_len, data_end, pkt);
}

/* Flood guard: may this CPU pin one more new flow in the current window? The window is
 * NEW_PIN_WINDOW_NS of the control plane's published clock (lb_config.epoch_ns), so it starts
 * at the first pin after the previous one ended, and its boundary is seen when the next tick
 * is published (every refresh_ns / 2). Per CPU, so no two CPUs share the counter. */
static __always_inline int pin_allowed(const struct lb_config *cfg, __u64 now)
{
	__u32 cap = cfg->max_new_per_s_per_cpu;
	if (cap == 0)
		return 1;
	__u32 zero = 0;
	struct pin_window *w = pin_windows.lookup(&zero);
	if (!w)
		return 1;
	__s64 age = (__s64)(now - w->start_ns);
	if (age >= NEW_PIN_WINDOW_NS || age < 0) { /* a new window (or a clock set back) */
		w->start_ns = now;
		w->pins = 0;
	}
	if (w->pins >= cap)
		return 0;
	w->pins += 1;
	return 1;
}

/* Written in place in the ring (reserve + submit): no copy of the record through the stack. */
static __always_inline void emit(struct packet *pkt, struct backend *be, __u32 backend_idx,
				 __u32 service_idx, __u64 now, __u8 kind)
{
	struct flow_event *ev = flow_events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		count(STAT_EVENT_LOST);
		return;
	}
	ev->key = pkt->key;
	__builtin_memcpy(ev->backend_addr, be->addr, sizeof(ev->backend_addr));
	ev->backend = backend_idx;
	ev->service = service_idx;
	ev->time_ns = now;
	ev->kind = kind;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad)); /* the ring's memory is not zeroed */
	flow_events.ringbuf_submit(ev, 0);
}

/* Count the packet for its service and backend, address it to the backend, XDP_TX. Inlined at
 * each call: on the established path new_flow is the constant 0 and its branches vanish. */
static __always_inline int forward(struct ethhdr *eth, void *data_end, struct packet *pkt,
				   const struct lb_config *cfg, const struct backend *be, __u32 service_idx,
				   __u32 backend_idx, __u32 new_flow, __u32 closed)
{
	if (pkt->icmp_too_big)
		count(STAT_ICMP_TOO_BIG);
	__u64 bytes = data_end - (void *)eth;
	struct service_stats *ss = service_stats.lookup(&service_idx);
	if (ss) {
		ss->packets += 1;
		ss->bytes += bytes;
		ss->new_flows += new_flow; /* one lookup of each stats entry for a new flow too */
	}
	struct backend_stats *bs = backend_stats.lookup(&backend_idx);
	if (bs) {
		bs->packets += 1;
		bs->bytes += bytes;
		bs->new_flows += new_flow;
		bs->closed += closed; /* least connections: a flow's first FIN or RST */
	}
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->mac, ETH_ALEN);
	return verdict(STAT_TX, XDP_TX);
}

int xdp_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return verdict(STAT_PASS_UNPARSED, XDP_PASS);
	__u32 zero = 0;
	struct lb_config *cfg = config.lookup(&zero);
	if (!cfg)
		return verdict(STAT_PASS, XDP_PASS);
	/* Only frames sent to us. XDP runs before the stack's MAC filter, so a switch flooding
	 * unknown unicast (say, to a peer node whose link is down) would otherwise make two nodes
	 * forward the same frame. The kernel drops what we pass as "other host". */
	if (*(__u32 *)eth->h_dest != *(__u32 *)cfg->mac ||
	    *(__u16 *)(eth->h_dest + 4) != *(__u16 *)(cfg->mac + 4))
		return verdict(STAT_PASS_NOT_OURS, XDP_PASS);

	struct packet pkt = {};
	int parsed;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		parsed = parse_ipv4(eth + 1, data_end, &pkt);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		parsed = parse_ipv6(eth + 1, data_end, &pkt);
	else
		return verdict(STAT_PASS, XDP_PASS);

	if (parsed == PARSE_UNPARSED)
		return verdict(STAT_PASS_UNPARSED, XDP_PASS);
	if (parsed == PARSE_NOT_OURS)
		return verdict(STAT_PASS, XDP_PASS);
	if (parsed == PARSE_FRAGMENT) {
		struct vip_key vk = {};
		__builtin_memcpy(vk.addr, pkt.key.dst, sizeof(vk.addr));
		if (vips.lookup(&vk))
			return verdict(STAT_DROP_FRAGMENT, XDP_DROP);
		return verdict(STAT_PASS, XDP_PASS);
	}

#if defined(LB_BENCH_NEW_FLOW) || defined(LB_BENCH_SPREAD_BITS)
	/* Benchmark builds only (bench/xdp.py). NEW_FLOW: each run of the same frame is a new
	 * client. SPREAD_BITS: the n-th run is one of 2^bits clients pinned beforehand, visited in
	 * an order spread over the flow table (an odd multiplier permutes the indexes). */
	__u64 *bench_n = bench_counter.lookup(&zero);
	if (bench_n) {
		*bench_n += 1;
#ifdef LB_BENCH_SPREAD_BITS
		pkt.key.src[3] ^= ((__u32)*bench_n * 2654435761u) & ((1u << LB_BENCH_SPREAD_BITS) - 1);
#else
		pkt.key.src[3] ^= (__u32)*bench_n;
#endif
	}
#endif
	/* The control plane's clock, written every refresh interval: reading the kernel's clock
	 * here cost 20-70 ns a packet (coarse / precise), a third of the whole fast path. */
	__u64 now = cfg->epoch_ns;
	int is_tcp = pkt.key.proto == IPPROTO_TCP && !pkt.icmp_too_big;
	int bare_syn = is_tcp && (pkt.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	int closing = is_tcp && (pkt.tcp_flags & (TCP_FIN | TCP_RST));
	struct backend *be;
	struct service *svc;
	__u32 backend_idx, service_idx;
	__u32 new_flow = 0; /* this packet pinned its flow */
	__u32 closed = 0; /* this packet is its pinned flow's first FIN or RST */

	/* Fast path: a pinned flow of a live service to a valid backend. Looked up before the
	 * service, so an established packet costs one hash lookup. */
	struct flow *flow = flows.lookup(&pkt.key);
	if (flow && bare_syn && (flow->flags & FLOW_F_CLOSING)) {
		/* A new connection reusing the 5-tuple of a closed one starts afresh. */
		flows.delete(&pkt.key);
		flow = NULL;
	}
	if (flow) {
		backend_idx = flow->backend;
		service_idx = flow->service;
		svc = service_slots.lookup(&service_idx);
		be = backends.lookup(&backend_idx);
		if (svc && (svc->flags & SERVICE_F_ACTIVE) && be && (be->flags & BACKEND_F_VALID)) {
			if (be->flags & BACKEND_F_UNRESOLVED)
				return verdict(STAT_DROP_UNRESOLVED, XDP_DROP); /* TCP retransmits; re-choosing would reset */
			if ((__s64)(now - flow->last_seen_ns) > (__s64)cfg->refresh_ns) {
				flow->last_seen_ns = now;
				/* Forwarded here now: this node's connection, not only a peer's copy
				 * (least connections counts it here, bpf/counters.py ActiveTally). */
				flow->flags &= ~FLOW_F_SYNCED;
			}
			if (closing && !(flow->flags & FLOW_F_CLOSING)) {
				flow->flags |= FLOW_F_CLOSING;
				closed = 1;
				emit(&pkt, be, backend_idx, service_idx, now, EVENT_FLOW_CLOSE);
			}
			return forward(eth, data_end, &pkt, cfg, be, service_idx, backend_idx, 0, closed);
		}
		count(STAT_FLOW_REPINNED);
	}

	struct service_key sk = {};
	__builtin_memcpy(sk.vip, pkt.key.dst, sizeof(sk.vip));
	sk.port = pkt.key.dport;
	sk.proto = pkt.key.proto;
	__u32 *found = services.lookup(&sk);
	if (!found)
		return verdict(STAT_PASS, XDP_PASS);
	service_idx = *found;
	svc = service_slots.lookup(&service_idx);
	if (!svc || !(svc->flags & SERVICE_F_ACTIVE))
		return verdict(STAT_PASS, XDP_PASS);

	__u32 slot = svc->table_base + (flow_hash(&pkt.key) & CH_TABLE_MASK);
	__u32 *chosen = ch_tables.lookup(&slot);
	if (!chosen || *chosen == NO_BACKEND)
		goto no_backend;
	backend_idx = *chosen;
	be = backends.lookup(&backend_idx);
	if (!be || !(be->flags & BACKEND_F_VALID) || (be->flags & BACKEND_F_UNRESOLVED))
		goto no_backend;

	if (bare_syn) {
		count(STAT_SYN_UNPINNED);
	} else if (pkt.icmp_too_big || (is_tcp && (pkt.tcp_flags & TCP_RST))) {
		/* never pinned */
	} else if (!pin_allowed(cfg, now)) {
		count(STAT_FLOOD_UNPINNED); /* the table alone decides, as for a SYN; no ring event */
	} else {
		/* A flow that arrives here at its FIN (moved from another node) is already closing. */
		struct flow pinned = {.backend = backend_idx, .service = service_idx, .last_seen_ns = now,
				      .flags = closing ? FLOW_F_CLOSING : 0};
		flows.update(&pkt.key, &pinned);
		count(STAT_NEW_FLOW);
		new_flow = 1; /* counted by forward() */
		closed = closing; /* pinned at its FIN (moved from another node): opened and closed at once */
		emit(&pkt, be, backend_idx, service_idx, now, EVENT_FLOW_NEW);
	}

	return forward(eth, data_end, &pkt, cfg, be, service_idx, backend_idx, new_flow, closed);

no_backend:;
	struct service_stats *ss_drop = service_stats.lookup(&service_idx);
	if (ss_drop)
		ss_drop->drops += 1;
	return verdict(STAT_DROP_NO_BACKEND, XDP_DROP);
}
