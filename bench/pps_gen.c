/* Traffic generator of bench/pps.py, run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES
 * inside the generator's namespace: every repetition runs this program on a live frame, and
 * XDP_REDIRECT sends it out of GEN_IFINDEX (a veth; its peer is the device under test).
 *
 * The kernel recycles a live frame's page with whatever the last program wrote into it: a
 * forwarder swapped its MACs, lbnode wrote a backend's. So both MACs are written again here on
 * every frame, or after the first lap the device under test sees frames not addressed to it.
 * With GEN_FLOWS > 1 the n-th frame of a CPU takes UDP source port n mod GEN_FLOWS (a power of
 * two): that many 5-tuples, visited in turn. The UDP checksum is 0 (none), so it stays valid.
 *
 * Compiled by bench/pps.py with -D: GEN_IFINDEX (resolved in the generator's namespace),
 * GEN_DST_MAC / GEN_SRC_MAC (six comma-separated bytes), GEN_FLOWS.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

/* Frames this CPU generated: the n of the source-port rotation. */
BPF_PERCPU_ARRAY(gen_frames, __u64, 1);

int xdp_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return XDP_ABORTED;
	__u8 dst[ETH_ALEN] = {GEN_DST_MAC};
	__u8 src[ETH_ALEN] = {GEN_SRC_MAC};
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
#if GEN_FLOWS > 1
	__u32 zero = 0;
	__u64 *n = gen_frames.lookup(&zero);
	if (n) {
		udp->source = bpf_htons((__u16)(*n & (GEN_FLOWS - 1)));
		*n += 1;
	}
#endif
	return bpf_redirect(GEN_IFINDEX, 0);
}
