/* Packet sink of bench/pps.py: counts every frame (per CPU) and drops it. On the generator's
 * veth it is where a forwarder's XDP_TX arrives (a veth delivers XDP_TX only to a peer that has
 * an XDP program); on the device under test it is the "limit" case: what the generator and the
 * veth pair move when nothing is forwarded. */
#include <uapi/linux/bpf.h>

BPF_PERCPU_ARRAY(sink_frames, __u64, 1);

int xdp_sink(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *n = sink_frames.lookup(&zero);
	if (n)
		*n += 1;
	return XDP_DROP;
}
