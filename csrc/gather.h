/*
 * A worker's loop for array sources (shmfeed.sources.Arrays, Windows), in C: claim a
 * batch, take its slot, compute its sample indices from the epoch order and copy those
 * rows of every leaf into the slot, publish; again, until something needs Python.
 *
 * Why: such a batch is only a memcpy per row, a few microseconds for 32 rows of 2 KB,
 * and the Python around it (claim, acquire, order, gather, publish: ~15 calls) cost
 * more than the copy, on the same CPUs the training loop runs on.
 *
 * It builds exactly what the Python path (shmfeed/_build.py Builder.fill with
 * _arrays.py) builds: the batch's positions are those of shmfeed/_order.py
 * Order.batch_items, mapped by shmf_permute / shmf_block_permute with the epoch's key,
 * and each leaf's rows are copied by shmf_gather_rows.  Only the common case runs
 * here; the loop returns, holding the claim, for anything else (a batch of another
 * epoch, whose key the caller derives; a slot not there yet; a batch outside the
 * plan), and the caller builds that one the Python way.
 *
 * Plain C11, no Python.h; the binding is Control.gather_batches in _core.c.
 */
#ifndef SHMFEED_GATHER_H
#define SHMFEED_GATHER_H

#include <stddef.h>
#include <stdint.h>

#include "shmfeed_ctl.h"

typedef struct {
    const char *src;   /* row i of the source is the row_bytes bytes at src + i * stride */
    uint64_t n_rows;   /* rows readable from src */
    size_t stride;
    size_t row_bytes;
    size_t offset;     /* of the leaf in a slot */
} shmf_gather_leaf;

/* The epoch order's arithmetic (shmfeed/_order.py Order), and the leaves. */
typedef struct {
    uint64_t n_items;
    uint64_t batch_size;
    uint64_t shard_count;
    uint64_t shard_index;
    uint64_t full_batches; /* batches of batch_size rows */
    uint64_t tail_rows;    /* rows of the last batch, 0 if none */
    int shuffle;           /* SHMF_ORDER_NONE / _FULL / _BLOCK */
    uint64_t shuffle_block;
    uint64_t epoch;        /* the epoch `key` orders; a claim of another one returns */
    uint64_t key;
    uint32_t n_leaves;
    const shmf_gather_leaf *leaves;
    int64_t *scratch;      /* batch_size int64s */
} shmf_gather_plan;

enum { SHMF_ORDER_NONE = 0, SHMF_ORDER_FULL = 1, SHMF_ORDER_BLOCK = 2 };

/* Worker: build batches of plan->epoch until something else comes.  Returns what
 * shmf_claim_wait returned then: SHMF_OK with (*gen, *epoch, *batch) claimed and NOT
 * built (the caller builds it), SHMF_EPOCH_DONE, SHMF_TIMEOUT (nothing claimable within
 * timeout_s of waiting), SHMF_INTERRUPTED, SHMF_SHUTDOWN; or SHMF_EINVAL with the
 * batch's slot still FILLING, if a copy failed (the plan does not fit the ring: a bug;
 * the worker must exit, and its slot and claim are reclaimed). */
shmf_status shmf_gather_batches(void *base, uint32_t worker, const shmf_gather_plan *plan,
                                double timeout_s, uint32_t *gen, uint64_t *epoch, uint32_t *batch);

#endif
