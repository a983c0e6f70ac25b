/*
 * shmfeed's hot loops outside the control block: pure functions over plain arrays.
 *
 * Plain C11, no Python.h (the CPython binding is _kernels.c; _core.c's worker loop
 * for array sources calls the same kernels).  Nothing here allocates, locks or keeps
 * state between calls; every kernel returns an shmf_kstatus and writes only its
 * output array.
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

/* Gathers of at least this many bytes write around the cache (non-temporal stores):
 * a batch that large is evicted from the last-level cache by the slots written after
 * it long before the consumer reads it, so a cached store only adds the read of each
 * destination line (read-for-ownership) to the memory traffic.  Measured on a 2-core
 * EPYC VM (32 MiB L3, two processes each cycling 8 buffers): cached stores win at
 * 1.15 MiB (31 against 21 GB/s), break even at 2.3 MiB, lose at 4.6 MiB (21.5 against
 * 24.7 GB/s) and at 9.2 MiB (17.6 against 24.0 GB/s). */
#define SHMF_STREAM_MIN_BYTES (UINT64_C(4) << 20)

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

/* How many whole rows a source of `src_bytes` bytes holds, row i being the `row_bytes`
 * bytes at i * src_stride (both >= 1): what shmf_gather_rows takes as n_rows. */
static inline uint64_t shmf_rows_in(uint64_t src_bytes, uint64_t src_stride, uint64_t row_bytes) {
    return src_bytes < row_bytes ? 0 : (src_bytes - row_bytes) / src_stride + 1;
}

/* Copy n bytes from src to dst with non-temporal stores where the CPU has them (the
 * copy of a large slot's rows: see SHMF_STREAM_MIN_BYTES), fenced, so that the stores
 * are visible before the caller publishes the slot. */
void shmf_copy_stream(void *dst, const void *src, size_t n);

/* Copy rows idx[0..count) of a source whose row i is the `row_bytes` bytes at
 * src + i * src_stride (rows may overlap: windows over a token stream), i in
 * [0, n_rows), one after another into dst (count * row_bytes bytes).  Every index is
 * checked before anything is written (SHMF_K_ERANGE: dst untouched).  Large gathers
 * (SHMF_STREAM_MIN_BYTES) use non-temporal stores where the CPU has them. */
shmf_kstatus shmf_gather_rows(const void *src, uint64_t n_rows, size_t src_stride, size_t row_bytes,
                              const int64_t *idx, size_t count, void *dst);

#endif
