/* A worker's loop for array sources: see gather.h. */
#define _GNU_SOURCE /* clock_gettime under -std=c11 */
#include "gather.h"

#include <time.h>

#include "kernels.h"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Batch `b` of the epoch (its index in the whole epoch): its rows, and its positions
 * in p->scratch, as Order.batch_items computes them; 0 rows when b is past the end. */
static uint64_t batch_positions(const shmf_gather_plan *p, uint64_t b) {
    uint64_t rows = b < p->full_batches ? p->batch_size : p->tail_rows;
    if (b > p->full_batches || rows == 0) return 0;
    uint64_t first = b * p->shard_count * p->batch_size + p->shard_index * rows;
    for (uint64_t r = 0; r < rows; r++) p->scratch[r] = (int64_t)(first + r);
    return rows;
}

static int fill(const shmf_gather_plan *p, char *slot_data, uint64_t rows) {
    int64_t *pos = p->scratch;
    shmf_kstatus st = SHMF_K_OK;
    if (p->shuffle == SHMF_ORDER_FULL)
        st = shmf_permute(p->n_items, p->key, pos, pos, rows);
    else if (p->shuffle == SHMF_ORDER_BLOCK)
        st = shmf_block_permute(p->n_items, p->shuffle_block, p->key, pos, pos, rows);
    for (uint32_t i = 0; st == SHMF_K_OK && i < p->n_leaves; i++) {
        const shmf_gather_leaf *lf = &p->leaves[i];
        st = shmf_gather_rows(lf->src, lf->n_rows, lf->stride, lf->row_bytes, pos, rows,
                              slot_data + lf->offset);
    }
    return st == SHMF_K_OK;
}

shmf_status shmf_gather_batches(void *base, uint32_t worker, const shmf_gather_plan *plan,
                                double timeout_s, uint32_t *gen, uint64_t *epoch, uint32_t *batch) {
    shmf_header *h = shmf_hdr(base);
    for (;;) {
        shmf_status st = shmf_claim_wait(base, worker, timeout_s, gen, epoch, batch);
        if (st != SHMF_OK || *epoch != plan->epoch) return st;
        const shmf_gen_info *info = &h->gens[*gen % SHMF_GEN_TABLE];
        uint64_t rows = batch_positions(plan, info->first_batch + *batch);
        uint32_t slot;
        /* Not waiting: claim_wait saw the slot assigned, so it is there unless the batch
         * went stale or another worker owns it; the caller's build_batch sorts that out. */
        if (rows == 0 || shmf_acquire(base, worker, *gen, *batch, 0, &slot) != SHMF_OK)
            return SHMF_OK;
        uint64_t t0 = now_ns();
        if (!fill(plan, (char *)base + h->data_offset + (uint64_t)slot * h->slot_bytes, rows))
            return SHMF_EINVAL;
        st = shmf_publish(base, worker, slot, *gen, *batch, rows, SHMF_READY, now_ns() - t0);
        if (st != SHMF_OK) return st;
    }
}
