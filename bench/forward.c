/* Bare XDP_TX forwarder of bench/http.py: what the DSR topology costs without lbnode. Parse
 * Ethernet and IPv4; a frame to FWD_VIP (a __be32) goes to FWD_DST_MAC from FWD_SRC_MAC (-D, six
 * comma-separated bytes each: the backend's MAC and the node's) with XDP_TX; anything else
 * passes (ARP, the node's own traffic). Like bench/baseline.c, but to a fixed next hop instead
 * of back to the sender. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

int xdp_forward(struct xdp_md *ctx)
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
	if (ip->daddr != FWD_VIP)
		return XDP_PASS;
	__u8 dst[ETH_ALEN] = {FWD_DST_MAC};
	__u8 src[ETH_ALEN] = {FWD_SRC_MAC};
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	return XDP_TX;
}
