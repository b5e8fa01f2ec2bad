/* Benchmark baseline: the least an L2 forwarder does. Parse Ethernet and IPv4, swap the MACs,
 * XDP_TX. bench/xdp.py reports lbnode's per-packet cost as a multiple of this program's, and
 * bench/pps.py forwards with it ("bare").
 *
 * Built with -DFWD_VIP=<a __be32> -DFWD_DST_MAC=<six comma-separated bytes> -DFWD_SRC_MAC=<...>
 * it is bench/http.py's bare DSR forwarder instead: a frame to FWD_VIP goes to the backend's MAC
 * (FWD_DST_MAC) from the node's (FWD_SRC_MAC); anything else passes (ARP, the node's own traffic). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

int xdp_baseline(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
#ifdef FWD_VIP
	if (ip->daddr != FWD_VIP)
		return XDP_PASS;
	__u8 dst[ETH_ALEN] = {FWD_DST_MAC};
	__u8 src[ETH_ALEN] = {FWD_SRC_MAC};
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
#else
	unsigned char tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
#endif
	return XDP_TX;
}
