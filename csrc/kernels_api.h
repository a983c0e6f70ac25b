/*
 * The kernels (kernels.c) and the epoch order (order.c), handed from the extension
 * they are compiled into (_core, whose workers' loop calls them: gather.c) to the other
 * binding (_kernels.c), as a table of function pointers in a capsule.
 *
 * Why: compiled into both extensions, the process held two copies of each function,
 * which a build could let drift apart (different flags, a stale .so), and the order
 * Python computes would no longer be, byte for byte, the one the C loop runs.  One
 * copy, one table: _kernels imports _core's at load.  No Python.h here; the capsule's
 * name is the only thing the bindings share.
 */
#ifndef SHMFEED_KERNELS_API_H
#define SHMFEED_KERNELS_API_H

#include "kernels.h"
#include "order.h"

/* The capsule's name; it is _core's attribute `kernels_api`. */
#define SHMF_KERNELS_API_CAPSULE "shmfeed._core.kernels_api"

typedef struct {
    shmf_kstatus (*permute)(uint64_t n, uint64_t key, const int64_t *positions, int64_t *out,
                            size_t count);
    shmf_kstatus (*block_permute)(uint64_t n, uint64_t block, uint64_t key,
                                  const int64_t *positions, int64_t *out, size_t count);
    void (*copy_stream)(void *dst, const void *src, size_t n);
    shmf_kstatus (*gather_rows)(const void *src, uint64_t n_rows, size_t src_stride,
                                size_t row_bytes, const int64_t *idx, size_t count, void *dst);
    shmf_kstatus (*order_init)(shmf_order *o, uint64_t n_items, uint64_t batch_size,
                               uint64_t shard_count, uint64_t shard_index, int drop_last,
                               int shuffle, uint64_t shuffle_block);
    shmf_kstatus (*order_map)(const shmf_order *o, uint64_t key, const int64_t *positions,
                              int64_t *out, size_t count);
    shmf_kstatus (*order_batch)(const shmf_order *o, uint64_t key, uint64_t b, int64_t *out);
} shmf_kernels_api;

#endif
