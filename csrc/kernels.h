/*
 * shmfeed's hot loops outside the control block: pure functions over plain arrays.
 *
 * Plain C11, no Python.h (the CPython binding is _kernels.c).  Nothing here
 * allocates, locks or keeps state between calls; every function returns an
 * shmf_kstatus and writes only its output array.
 *
 * Epoch order.  The position -> sample map of an epoch is a keyed bijection on
 * [0, n), computed per position in O(1) memory for any n up to SHMF_ORDER_MAX_N:
 *
 *   - shmf_permute: a Feistel network on [0, a*b), a = ceil(sqrt(n)), b = ceil(n/a)
 *     (at least 2): a value is the pair (x / b, x % b), and each of
 *     SHMF_ORDER_ROUNDS half-rounds adds a keyed 64-bit hash of one half to the other,
 *     modulo its radix (the FFX "A2" construction); a pass ends by a keyed
 *     transposition of values 0 and 1, without which an odd radix would only ever
 *     give even permutations.  Domains of at most SHMF_ORDER_SMALL_N use
 *     SHMF_ORDER_ROUNDS_SMALL half-rounds: there, every one of the n! orders is
 *     about equally likely (checked for n <= 8).  Cycle walking: a value >= n is
 *     encrypted again until it lands in [0, n).  The walk stays on the cycle of the
 *     starting value, so it ends, and the map restricted to [0, n) is a bijection;
 *     since a*b - n < a, it steps again with probability < 1/b.
 *
 *   - shmf_block_permute: the same, over blocks of `block` consecutive samples,
 *     then within each block (keyed by the block), so that a run of `block`
 *     positions reads one run of `block` consecutive samples.  The last source
 *     block may be short (n % block samples): it occupies one position block
 *     chosen by the key, and the full blocks fill the others in Feistel order.
 *
 * `key` is 64 random bits (shmfeed derives it from (seed, epoch)); different keys
 * give unrelated orders.  `out` may be the same array as `positions`.
 */
#ifndef SHMFEED_KERNELS_H
#define SHMFEED_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define SHMF_ORDER_MAX_N (UINT64_C(1) << 40) /* samples; the largest n the order accepts */
#define SHMF_ORDER_ROUNDS 8                   /* Feistel half-rounds: 4 per half */
#define SHMF_ORDER_ROUNDS_SMALL 32             /* for domains of <= SHMF_ORDER_SMALL_N */
#define SHMF_ORDER_SMALL_N 64

typedef enum {
    SHMF_K_OK = 0,
    SHMF_K_EDOMAIN = 1, /* n (or block) outside [1, SHMF_ORDER_MAX_N] */
    SHMF_K_ERANGE = 2,  /* a position outside [0, n): nothing after it was written */
} shmf_kstatus;

/* out[i] = sample at position positions[i] of the order keyed by `key` on [0, n). */
shmf_kstatus shmf_permute(uint64_t n, uint64_t key, const int64_t *positions, int64_t *out,
                          size_t count);

/* The block order: blocks of `block` samples permuted, and samples within each. */
shmf_kstatus shmf_block_permute(uint64_t n, uint64_t block, uint64_t key,
                                const int64_t *positions, int64_t *out, size_t count);

#endif
