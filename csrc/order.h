/*
 * The epoch order: which samples each batch of an epoch holds, described once.
 *
 * Python (shmfeed/_order/order.py Order, through the _kernels binding) and the workers' C
 * loop for array sources (gather.c) both call these functions, so the two can never
 * disagree about a batch.  Plain C11, no Python.h, nothing allocated.
 *
 * Positions.  Position p of an epoch holds sample pi(p), where pi is the identity
 * (SHMF_SHUFFLE_NONE), the keyed bijection shmf_permute (SHMF_SHUFFLE_FULL) or
 * shmf_block_permute over runs of `shuffle_block` samples (SHMF_SHUFFLE_BLOCK), keyed
 * by the epoch's 64-bit key (derived from (seed, epoch) by the training process,
 * which publishes it with each generation: shmf_gen_info.key).
 *
 * Batches (elastic sharding).  With k = shard_count hosts of batch_size B, global
 * batch g is positions [g*k*B, (g+1)*k*B) and host h takes its rows [h*B, (h+1)*B).
 * The m = n mod (k*B) positions after the last full global batch make, unless
 * drop_last, a partial global batch split evenly: host h takes the q = m / k
 * positions from (n - m) + h*q (the m - k*q left over are not delivered that epoch);
 * q = 0 means no partial batch.  A batch-level source is batch_size 1 with drop_last.
 */
#ifndef SHMFEED_ORDER_H
#define SHMFEED_ORDER_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* The shuffle modes; shmfeed/_order/order.py maps its `shuffle` values onto these (exported
 * by _kernels as SHUFFLE_NONE / SHUFFLE_FULL / SHUFFLE_BLOCK). */
typedef enum {
    SHMF_SHUFFLE_NONE = 0,  /* shuffle=False */
    SHMF_SHUFFLE_FULL = 1,  /* shuffle=True */
    SHMF_SHUFFLE_BLOCK = 2, /* shuffle="block" */
} shmf_shuffle;

/* The name of the capsule through which _kernels.EpochOrder hands its shmf_order to
 * _core.GatherPlan (two extension modules, one struct). */
#define SHMF_ORDER_CAPSULE "shmfeed._kernels.shmf_order"

typedef struct {
    uint64_t n_items;       /* positions of an epoch */
    uint64_t batch_size;    /* rows of one host's full batch */
    uint64_t shard_count;
    uint64_t shard_index;
    uint64_t shuffle_block; /* samples per run, for SHMF_SHUFFLE_BLOCK */
    int shuffle;            /* shmf_shuffle */
    /* Derived by shmf_order_init, once: */
    uint64_t full_batches;  /* batches of batch_size rows */
    uint64_t tail_rows;     /* rows of this host's partial last batch; 0: there is none */
    uint64_t n_batches;     /* full_batches, plus 1 if tail_rows */
} shmf_order;

/* Fill *o.  SHMF_K_EDOMAIN: batch_size or shard_count 0, shard_index >= shard_count,
 * their product past 2^63, an unknown mode, shuffle_block 0, or a shuffled order of
 * more than SHMF_ORDER_MAX_N items (n_items 0 is an epoch without batches). */
shmf_kstatus shmf_order_init(shmf_order *o, uint64_t n_items, uint64_t batch_size,
                             uint64_t shard_count, uint64_t shard_index, int drop_last,
                             int shuffle, uint64_t shuffle_block);

/* Rows of this host's batch b; 0 when the epoch has no batch b. */
static inline uint64_t shmf_order_rows(const shmf_order *o, uint64_t b) {
    return b < o->full_batches ? o->batch_size : b < o->n_batches ? o->tail_rows : 0;
}

/* out[i] = sample at positions[i] of the epoch keyed by `key` (out may be positions).
 * SHMF_K_ERANGE: a position outside [0, n_items). */
shmf_kstatus shmf_order_map(const shmf_order *o, uint64_t key, const int64_t *positions,
                            int64_t *out, size_t count);

/* The samples of this host's batch b of the epoch keyed by `key`, in row order, into
 * out (shmf_order_rows(o, b) items).  SHMF_K_ERANGE: no batch b. */
shmf_kstatus shmf_order_batch(const shmf_order *o, uint64_t key, uint64_t b, int64_t *out);

#endif
