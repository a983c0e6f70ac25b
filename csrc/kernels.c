/* See kernels.h for what these compute and why they are bijections. */
#include "kernels.h"

#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h> /* non-temporal stores for large gathers */
#endif

#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)
/* Sub-keys of a block order, so that its three keyed maps never share a key. */
#define BLOCKS_STREAM UINT64_C(0x424C4F434B53) /* "BLOCKS" */
#define WITHIN_STREAM UINT64_C(0x57495448494E) /* "WITHIN" */
#define SLOT_STREAM UINT64_C(0x534C4F54)       /* "SLOT": where the short block goes */
#define SWAP_STREAM UINT64_C(0x53574150)       /* "SWAP" */

/* splitmix64's finaliser (Stafford's Mix13): every input bit flips each output bit
 * with probability ~1/2, which is what a Feistel round function needs. */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= UINT64_C(0xBF58476D1CE4E5B9);
    x ^= x >> 27;
    x *= UINT64_C(0x94D049BB133111EB);
    return x ^ (x >> 31);
}

/* Loops over lanes and rounds have constant trip counts; unrolling them lets the
 * lanes' independent multiplies overlap (1.7x faster than -O2 alone on x86-64). */
#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 8")
#else
#define UNROLL
#endif

/* The network of kernels.h on [0, a*b); a value is the pair (hi, lo) = (x / b, x % b). */
typedef struct {
    uint64_t n, a, b;
    uint64_t swap; /* 0 or 1: whether the pass ends by swapping values 0 and 1 */
    int rounds;
    uint64_t rk[SHMF_ORDER_ROUNDS_SMALL];
} feistel;

static uint64_t ceil_sqrt(uint64_t n) { /* n <= 2^40 */
    uint64_t a = 0;
    for (int bit = 20; bit >= 0; bit--) {
        uint64_t t = a | (UINT64_C(1) << bit);
        if (t * t <= n) a = t;
    }
    return a * a < n ? a + 1 : a;
}

static void feistel_init(feistel *f, uint64_t n, uint64_t key) {
    uint64_t a = ceil_sqrt(n);
    f->n = n;
    f->a = a;
    f->b = (n + a - 1) / a;
    if (f->b < 2) f->b = 2; /* so that values 0 and 1 are (0, 0) and (0, 1) */
    f->swap = mix64(key ^ SWAP_STREAM) & 1;
    f->rounds = n <= SHMF_ORDER_SMALL_N ? SHMF_ORDER_ROUNDS_SMALL : SHMF_ORDER_ROUNDS;
    for (int r = 0; r < f->rounds; r++) f->rk[r] = mix64(key + (uint64_t)(r + 1) * GOLDEN);
}

/* A uniform value in [0, m) from the top 32 bits of h (m <= 2^21 here, so the
 * product fits and the bias is below 2^-11 of a step). */
static inline uint64_t below(uint64_t h, uint64_t m) { return ((h >> 32) * m) >> 32; }

static inline uint64_t add_mod(uint64_t x, uint64_t y, uint64_t m) {
    x += y;
    return x >= m ? x - m : x;
}

/* (x / b, x % b) for x < 2^41, b < 2^21: by a double division, pipelined where an
 * integer one is not.  Exact: the quotient is below 2^20, where doubles are spaced
 * 2^-32 apart, while a fraction of the form r/b stays 1/b >= 2^-21 away from the
 * next integer, so rounding never reaches it and truncation gives the floor. */
static inline void split(uint64_t x, uint64_t b, uint64_t *hi, uint64_t *lo) {
    *hi = (uint64_t)((double)x / (double)b);
    *lo = x - *hi * b;
}

/* Round r of a pass adds a keyed hash of one half to the other; a pass ends by the
 * key's transposition of values 0 and 1.  (Every round is an even permutation when
 * the radix is odd: without the transposition, a small n would never see half of
 * its orders.) */
static inline uint64_t round_hi(const feistel *f, int r, uint64_t hi, uint64_t lo, uint64_t tweak) {
    return add_mod(hi, below(mix64(lo ^ f->rk[r] ^ tweak), f->a), f->a);
}

static inline uint64_t round_lo(const feistel *f, int r, uint64_t hi, uint64_t lo, uint64_t tweak) {
    return add_mod(lo, below(mix64(hi ^ f->rk[r + 1] ^ tweak), f->b), f->b);
}

static inline uint64_t end_lo(const feistel *f, uint64_t hi, uint64_t lo) {
    return lo ^ (f->swap & (hi == 0) & (lo < 2));
}

/* One pass on a pair. */
static inline void feistel_pass(const feistel *f, uint64_t *hi_p, uint64_t *lo_p, uint64_t tweak) {
    uint64_t hi = *hi_p, lo = *lo_p;
    for (int r = 0; r < f->rounds; r += 2) {
        hi = round_hi(f, r, hi, lo, tweak);
        lo = round_lo(f, r, hi, lo, tweak);
    }
    *hi_p = hi;
    *lo_p = end_lo(f, hi, lo);
}

static inline uint64_t feistel_at(const feistel *f, uint64_t x, uint64_t tweak) {
    if (f->n == 1) return 0;
    uint64_t hi, lo;
    split(x, f->b, &hi, &lo);
    do feistel_pass(f, &hi, &lo, tweak);
    while (hi * f->b + lo >= f->n);
    return hi * f->b + lo;
}

/* feistel_at for LANES values at once.  One value is a chain of dependent
 * multiplies; interleaving independent ones hides the multiplier's latency.  A lane
 * that has landed in [0, n) keeps its value while the others walk on. */
#define LANES 4
static inline void feistel_lanes(const feistel *f, uint64_t x[LANES], const uint64_t tweak[LANES]) {
    if (f->n == 1) {
        for (int j = 0; j < LANES; j++) x[j] = 0;
        return;
    }
    const uint64_t b = f->b;
    uint64_t lo[LANES], hi[LANES];
    UNROLL for (int j = 0; j < LANES; j++) split(x[j], b, &hi[j], &lo[j]);
    for (int r = 0; r < f->rounds; r += 2) {
        UNROLL for (int j = 0; j < LANES; j++) hi[j] = round_hi(f, r, hi[j], lo[j], tweak[j]);
        UNROLL for (int j = 0; j < LANES; j++) lo[j] = round_lo(f, r, hi[j], lo[j], tweak[j]);
    }
    UNROLL for (int j = 0; j < LANES; j++) {
        lo[j] = end_lo(f, hi[j], lo[j]);
        while (hi[j] * b + lo[j] >= f->n) feistel_pass(f, &hi[j], &lo[j], tweak[j]);
        x[j] = hi[j] * b + lo[j];
    }
}

shmf_kstatus shmf_permute(uint64_t n, uint64_t key, const int64_t *positions, int64_t *out,
                          size_t count) {
    if (n == 0 || n > SHMF_ORDER_MAX_N) return SHMF_K_EDOMAIN;
    feistel f;
    feistel_init(&f, n, key);
    const uint64_t tweak[LANES] = {0};
    for (size_t i = 0; i < count; i += LANES) {
        size_t m = count - i < LANES ? count - i : LANES;
        uint64_t x[LANES] = {0}; /* unused lanes walk from 0 and are dropped */
        for (size_t j = 0; j < m; j++) {
            x[j] = (uint64_t)positions[i + j]; /* a negative position wraps to >= n */
            if (x[j] >= n) return SHMF_K_ERANGE;
        }
        feistel_lanes(&f, x, tweak);
        for (size_t j = 0; j < m; j++) out[i + j] = (int64_t)x[j];
    }
    return SHMF_K_OK;
}

shmf_kstatus shmf_block_permute(uint64_t n, uint64_t block, uint64_t key,
                                const int64_t *positions, int64_t *out, size_t count) {
    if (n == 0 || n > SHMF_ORDER_MAX_N || block == 0 || block > SHMF_ORDER_MAX_N)
        return SHMF_K_EDOMAIN;
    if (block > n) block = n;
    uint64_t n_blocks = (n + block - 1) / block;
    uint64_t short_rows = n - (n_blocks - 1) * block; /* rows of the last source block */
    int has_short = short_rows != block;
    uint64_t n_full = n_blocks - (uint64_t)has_short;
    /* The position block that holds the short source block; with none, past the end. */
    uint64_t short_at = has_short ? mix64(key ^ SLOT_STREAM) % n_blocks : n_blocks;
    uint64_t short_first = short_at * block;
    feistel blocks, within, within_short;
    feistel_init(&blocks, n_full, mix64(key ^ BLOCKS_STREAM)); /* n_full >= 1 */
    uint64_t within_key = mix64(key ^ WITHIN_STREAM);
    feistel_init(&within, block, within_key);
    feistel_init(&within_short, short_rows, within_key);
    /* Each block's samples are permuted by its own key: the within key tweaked by it. */
    uint64_t short_tweak = mix64(n_blocks - 1 + GOLDEN);
    /* Consecutive positions mostly share a block: remember the last one's. */
    uint64_t last_rank = UINT64_MAX, last_base = 0, last_tweak = 0;
    for (size_t i = 0; i < count; i += LANES) {
        size_t m = count - i < LANES ? count - i : LANES;
        uint64_t offset[LANES] = {0}, base[LANES] = {0}, tweak[LANES] = {0};
        for (size_t j = 0; j < m; j++) {
            uint64_t p = (uint64_t)positions[i + j];
            if (p >= n) return SHMF_K_ERANGE;
            if (p >= short_first && p < short_first + short_rows) {
                /* Rare (one block of the epoch): done here, alone. */
                out[i + j] = (int64_t)((n_blocks - 1) * block +
                                       feistel_at(&within_short, p - short_first, short_tweak));
                base[j] = UINT64_MAX;
                continue;
            }
            /* Rank among the full blocks: those after the short one are shifted by it. */
            uint64_t q = p < short_first ? p : p - short_rows;
            uint64_t rank = q / block;
            if (rank != last_rank) {
                uint64_t src = feistel_at(&blocks, rank, 0);
                last_rank = rank;
                last_base = src * block;
                last_tweak = mix64(src + GOLDEN);
            }
            offset[j] = q - rank * block;
            base[j] = last_base;
            tweak[j] = last_tweak;
        }
        feistel_lanes(&within, offset, tweak);
        for (size_t j = 0; j < m; j++)
            if (base[j] != UINT64_MAX) out[i + j] = (int64_t)(base[j] + offset[j]);
    }
    return SHMF_K_OK;
}

/* One row into dst with non-temporal stores: the 16-byte aligned middle is streamed,
 * the unaligned ends (if any) are copied through the cache. */
static void copy_row_stream(char *dst, const char *src, size_t n) {
#if defined(__SSE2__)
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n) head = n;
    memcpy(dst, src, head);
    size_t k = head;
    for (; k + 64 <= n; k += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + k));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + k + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + k + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + k + 48));
        _mm_stream_si128((__m128i *)(dst + k), a);
        _mm_stream_si128((__m128i *)(dst + k + 16), b);
        _mm_stream_si128((__m128i *)(dst + k + 32), c);
        _mm_stream_si128((__m128i *)(dst + k + 48), d);
    }
    memcpy(dst + k, src + k, n - k);
#else
    memcpy(dst, src, n);
#endif
}

void shmf_copy_stream(void *dst, const void *src, size_t n) {
    copy_row_stream(dst, src, n);
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

shmf_kstatus shmf_gather_rows(const void *src, uint64_t n_rows, size_t src_stride, size_t row_bytes,
                              const int64_t *idx, size_t count, void *dst) {
    for (size_t i = 0; i < count; i++)
        if ((uint64_t)idx[i] >= n_rows) return SHMF_K_ERANGE; /* a negative index wraps too */
    const char *s = src;
    char *d = dst;
    if ((uint64_t)count * row_bytes < SHMF_STREAM_MIN_BYTES) {
        for (size_t i = 0; i < count; i++, d += row_bytes)
            memcpy(d, s + (size_t)idx[i] * src_stride, row_bytes);
        return SHMF_K_OK;
    }
    for (size_t i = 0; i < count; i++, d += row_bytes)
        copy_row_stream(d, s + (size_t)idx[i] * src_stride, row_bytes);
#if defined(__SSE2__)
    /* Streamed stores are weakly ordered: make them visible before the caller
     * publishes the slot (whose release store orders only ordinary stores). */
    _mm_sfence();
#endif
    return SHMF_K_OK;
}
