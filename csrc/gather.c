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

/* Batch `b` of the epoch keyed by `key` (b: its index in the whole epoch) into the
 * slot's bytes; 0 if a copy failed. */
static int fill(const shmf_gather_plan *p, uint64_t key, uint64_t b, int64_t *pos,
                char *slot_data, uint64_t rows) {
    shmf_kstatus st = shmf_order_batch(&p->order, key, b, pos);
    for (uint32_t i = 0; st == SHMF_K_OK && i < p->n_leaves; i++) {
        const shmf_gather_leaf *lf = &p->leaves[i];
        st = shmf_gather_rows(lf->src, lf->n_rows, lf->stride, lf->row_bytes, pos, rows,
                              slot_data + lf->offset);
    }
    return st == SHMF_K_OK;
}

shmf_status shmf_gather_batches(void *base, uint32_t worker, const shmf_gather_plan *plan,
                                int64_t *scratch, double timeout_s, uint32_t *gen,
                                uint64_t *epoch, uint32_t *batch) {
    shmf_header *h = shmf_hdr(base);
    for (;;) {
        shmf_status st = shmf_claim_wait(base, worker, timeout_s, gen, epoch, batch);
        if (st != SHMF_OK) return st;
        /* Written before the generation's claim word, which claim_wait has read. */
        const shmf_gen_info *info = &h->gens[*gen % SHMF_GEN_TABLE];
        uint64_t b = info->first_batch + *batch;
        uint64_t rows = shmf_order_rows(&plan->order, b);
        uint32_t slot;
        /* Not waiting: claim_wait saw the slot assigned, so it is there unless the batch
         * went stale or another worker owns it; the caller's build_batch sorts that out. */
        if (rows == 0 || shmf_acquire(base, worker, *gen, *batch, 0, &slot) != SHMF_OK)
            return SHMF_OK;
        uint64_t t0 = now_ns();
        if (!fill(plan, info->key, b, scratch,
                  (char *)base + h->data_offset + (uint64_t)slot * h->slot_bytes, rows))
            return SHMF_EINVAL;
        st = shmf_publish(base, worker, slot, *gen, *batch, rows, SHMF_READY, now_ns() - t0);
        if (st != SHMF_OK) return st;
    }
}
