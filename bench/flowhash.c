/* Flow-hash micro-benchmark of bench/xdp.py: the cost of one flow hash, the one lbnode uses
 * (bpf/flowhash.h) against the alternative below. Each run hashes HASH_ROUNDS keys in a chain
 * (each key takes the previous hash, so the hashes cannot overlap: the latency one packet pays);
 * bench/xdp.py subtracts the same chain with HASH_NONE (a trivial step) and divides.
 * -DHASH_CHALLENGER picks the alternative, -DHASH_NONE the trivial step. */
#include <uapi/linux/bpf.h>
#include "lbnode.h"
#include "flowhash.h"

#ifndef HASH_ROUNDS
#define HASH_ROUNDS 64
#endif

/* The alternative: murmur3_32 over the key's ten words (host order), with the same seed; what
 * lbnode used before xxh32. */
static __always_inline __u32 challenger_hash(const struct flow_key *key)
{
	const __u32 *words = (const __u32 *)key;
	__u32 h = FLOW_HASH_SEED;
#pragma unroll
	for (int i = 0; i < sizeof(*key) / 4; i++) {
		__u32 k = words[i] * 0xcc9e2d51u;
		k = rotl32(k, 15) * 0x1b873593u;
		h ^= k;
		h = rotl32(h, 13) * 5 + 0xe6546b64u;
	}
	h ^= sizeof(*key);
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

#if defined(HASH_NONE)
#define HASH(k) ((k)->src[0] * 3 + 1)
#elif defined(HASH_CHALLENGER)
#define HASH(k) challenger_hash(k)
#else
#define HASH(k) flow_hash(k)
#endif

/* The last chain's result, so the compiler cannot drop the work. */
BPF_ARRAY(hash_out, __u32, 1);

int xdp_hash(struct xdp_md *ctx)
{
	struct flow_key key = {.src = {0, 0, 0xffff0000, 0x0700000a}, .dst = {0, 0, 0xffff0000, 0x6400000a},
			       .sport = 0x409c, .dport = 0x5000, .proto = 6};
	/* The chain starts from the frame's first word, so the compiler cannot fold it. */
	void *data = (void *)(long)ctx->data;
	if (data + sizeof(__u32) > (void *)(long)ctx->data_end)
		return XDP_PASS;
	__u32 h = *(__u32 *)data;
	for (int i = 0; i < HASH_ROUNDS; i++) {
		key.src[0] = h;
		h = HASH(&key);
	}
	__u32 zero = 0;
	__u32 *out = hash_out.lookup(&zero);
	if (out)
		*out = h;
	return XDP_DROP;
}
