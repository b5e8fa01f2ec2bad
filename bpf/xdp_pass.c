/* XDP_PASS on the peer of a veth: without an XDP program (or GRO) there, frames that our
 * program sends with XDP_TX out of the other end are silently dropped by the veth driver. */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
