/*
 * A worker's loop for array sources (shmfeed.sources.Arrays, Windows), in C: claim a
 * batch, take its slot, compute its sample indices from the epoch order (order.h,
 * keyed by the key the training process published with the batch's generation) and
 * copy those rows of every leaf into the slot, publish; again, until something needs
 * Python.
 *
 * Why: such a batch is only a memcpy per row, a few microseconds for 32 rows of 2 KB,
 * and the Python around it (claim, acquire, order, gather, publish: ~15 calls) cost
 * more than the copy, on the same CPUs the training loop runs on.
 *
 * It builds exactly what the Python path (shmfeed/_batch/build.py Builder.fill with
 * sources/_arrays.py) builds: the batch's samples come from shmf_order_batch, the function
 * shmfeed/_order/order.py Order.batch_items calls, and each leaf's rows are copied by
 * shmf_gather_rows.  Only the common case runs here; the loop returns, holding the
 * claim, for anything else (a slot not there yet, a batch outside the plan's order),
 * and the caller builds that one the Python way.
 *
 * Plain C11, no Python.h; the binding is _core.c's GatherPlan (built once per worker)
 * and Control.gather_batches.
 */
#ifndef SHMFEED_GATHER_H
#define SHMFEED_GATHER_H

#include <stddef.h>
#include <stdint.h>

#include "order.h"
#include "shmfeed_ctl.h"

typedef struct {
    const char *src;   /* row i of the source is the row_bytes bytes at src + i * stride */
    uint64_t n_rows;   /* rows readable from src */
    size_t stride;
    size_t row_bytes;
    size_t offset;     /* of the leaf in a slot */
} shmf_gather_leaf;

/* What a worker's loop builds with: the order (every epoch's: each generation
 * carries its key) and the leaves.  Made once per worker; read-only here. */
typedef struct {
    shmf_order order;
    uint32_t n_leaves;
    const shmf_gather_leaf *leaves;
} shmf_gather_plan;

/* Worker: build the batches it claims until one needs Python.  `scratch` holds
 * plan->order.batch_size int64s (the caller's: the plan is shared, read-only).
 * Returns what shmf_claim_wait returned then: SHMF_OK with (*gen, *epoch, *batch) claimed and NOT
 * built (the caller builds it), SHMF_EPOCH_DONE, SHMF_TIMEOUT (nothing claimable within
 * timeout_s of waiting), SHMF_INTERRUPTED, SHMF_SHUTDOWN; or SHMF_EINVAL with the
 * batch's slot still FILLING, if a copy failed (the plan does not fit the ring: a bug;
 * the worker must exit, and its slot and claim are reclaimed). */
shmf_status shmf_gather_batches(void *base, uint32_t worker, const shmf_gather_plan *plan,
                                int64_t *scratch, double timeout_s, uint32_t *gen, uint64_t *epoch, uint32_t *batch);

#endif
