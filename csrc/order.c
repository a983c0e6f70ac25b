/* See order.h: the one description of an epoch's order. */
#include "order.h"

shmf_kstatus shmf_order_init(shmf_order *o, uint64_t n_items, uint64_t batch_size,
                             uint64_t shard_count, uint64_t shard_index, int drop_last,
                             int shuffle, uint64_t shuffle_block) {
    if (batch_size == 0 || shard_count == 0 || shard_index >= shard_count ||
        batch_size > (UINT64_C(1) << 63) / shard_count || shuffle_block == 0 ||
        (shuffle != SHMF_SHUFFLE_NONE && shuffle != SHMF_SHUFFLE_FULL &&
         shuffle != SHMF_SHUFFLE_BLOCK) ||
        (shuffle != SHMF_SHUFFLE_NONE && n_items > SHMF_ORDER_MAX_N))
        return SHMF_K_EDOMAIN;
    uint64_t global = shard_count * batch_size;
    o->n_items = n_items;
    o->batch_size = batch_size;
    o->shard_count = shard_count;
    o->shard_index = shard_index;
    o->shuffle_block = shuffle_block;
    o->shuffle = shuffle;
    o->full_batches = n_items / global;
    o->tail_rows = drop_last ? 0 : n_items % global / shard_count;
    o->n_batches = o->full_batches + (o->tail_rows ? 1 : 0);
    return SHMF_K_OK;
}

shmf_kstatus shmf_order_map(const shmf_order *o, uint64_t key, const int64_t *positions,
                            int64_t *out, size_t count) {
    switch (o->shuffle) {
    case SHMF_SHUFFLE_FULL:
        return shmf_permute(o->n_items, key, positions, out, count);
    case SHMF_SHUFFLE_BLOCK:
        return shmf_block_permute(o->n_items, o->shuffle_block, key, positions, out, count);
    default:
        for (size_t i = 0; i < count; i++) {
            if ((uint64_t)positions[i] >= o->n_items) return SHMF_K_ERANGE;
            out[i] = positions[i];
        }
        return SHMF_K_OK;
    }
}

shmf_kstatus shmf_order_batch(const shmf_order *o, uint64_t key, uint64_t b, int64_t *out) {
    uint64_t rows = shmf_order_rows(o, b);
    if (rows == 0) return SHMF_K_ERANGE;
    uint64_t first = b * o->shard_count * o->batch_size + o->shard_index * rows;
    for (uint64_t r = 0; r < rows; r++) out[r] = (int64_t)(first + r);
    return shmf_order_map(o, key, out, out, (size_t)rows);
}
