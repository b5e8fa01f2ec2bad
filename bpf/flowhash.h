/* The flow hash: which consistent-hash slot, and so which backend, an unpinned flow gets. Every
 * node must compute the same one (a flow that ECMP moves to another node must land on the same
 * backend there), and bpf/flowhash.py mirrors it for user space (a bpf-tier test checks the two
 * agree). Include after lbnode.h (struct flow_key, FLOW_HASH_SEED).
 *
 * XXH32 of the key's 40 bytes (ten little-endian 32-bit words) seeded with FLOW_HASH_SEED.
 * Chosen over murmur3_32 by bench-xdp's hash rows (bench/flowhash.c): murmur3 is one chain of
 * dependent multiplies and rotates, word after word; xxh32 runs four independent lanes over the
 * first 32 bytes, half the latency (measured 13 against 28 ns a hash under BPF's JIT, which
 * has no rotate instruction). */
#ifndef FLOWHASH_H
#define FLOWHASH_H

#define XXH_P1 2654435761u
#define XXH_P2 2246822519u
#define XXH_P3 3266489917u
#define XXH_P4 668265263u

static __always_inline __u32 rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 xxh32_round(__u32 acc, __u32 input)
{
	return rotl32(acc + input * XXH_P2, 13) * XXH_P1;
}

static __always_inline __u32 flow_hash(const struct flow_key *key)
{
	const __u32 *w = (const __u32 *)key;
	__u32 v1 = FLOW_HASH_SEED + XXH_P1 + XXH_P2, v2 = FLOW_HASH_SEED + XXH_P2;
	__u32 v3 = FLOW_HASH_SEED, v4 = FLOW_HASH_SEED - XXH_P1;
#pragma unroll
	for (int i = 0; i < 8; i += 4) { /* two 16-byte stripes, one word per lane */
		v1 = xxh32_round(v1, w[i]);
		v2 = xxh32_round(v2, w[i + 1]);
		v3 = xxh32_round(v3, w[i + 2]);
		v4 = xxh32_round(v4, w[i + 3]);
	}
	__u32 h = rotl32(v1, 1) + rotl32(v2, 7) + rotl32(v3, 12) + rotl32(v4, 18) + sizeof(*key);
#pragma unroll
	for (int i = 8; i < sizeof(*key) / 4; i++) /* the last 8 bytes, a word at a time */
		h = rotl32(h + w[i] * XXH_P3, 17) * XXH_P4;
	h ^= h >> 15;
	h *= XXH_P2;
	h ^= h >> 13;
	h *= XXH_P3;
	h ^= h >> 16;
	return h;
}

#endif /* FLOWHASH_H */
