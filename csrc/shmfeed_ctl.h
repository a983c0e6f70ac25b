/*
 * shmfeed control block: the single source of truth for the shared-memory layout
 * that the training process, the supervisor and the workers all map.
 *
 * Plain C11, no Python.h.  Every function returns an shmf_status; nothing here
 * allocates, and nothing takes a lock: a process killed at any instruction leaves
 * the block in a state the others can repair (see shmf_reclaim).
 *
 * Mapping layout (all offsets from the start of the mapping):
 *
 *   [shmf_header][shmf_worker x max_workers][shmf_slot x n_slots]
 *   [report area: SHMF_REPORT_BYTES x n_slots][fatal message: SHMF_REPORT_BYTES]
 *   ... padding to SHMF_DATA_ALIGN ...
 *   [slot 0 data: slot_bytes][slot 1 data] ...
 *
 * Slot life cycle (state word, also the futex word):
 *
 *   FREE --worker acquire--> FILLING --publish--> READY --consumer take--> HELD
 *     ^                         |                                           |
 *     |                         +--publish error--> ERROR --consumer take---+
 *     +------------------ consumer release (last reference died) -----------+
 *
 * Batch b of the epoch with generation g lives in slot (slot_base(g) + b) % n_slots,
 * where each epoch starts at the slot after the last one the consumer took, so the
 * batch a training loop still holds across an epoch boundary is never in the way; a slot
 * carries the tag (g << 32 | b) of the batch it holds.  Claims come from one
 * 64-bit word (g << 32 | next batch), advanced by compare-and-swap after the worker
 * has recorded what it is about to claim, so the claim of a worker that dies at any
 * point can be recovered exactly.
 */
#ifndef SHMFEED_CTL_H
#define SHMFEED_CTL_H

#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>

#define SHMF_MAGIC 0x3144454546484d53ULL /* "SHMFEED1" little-endian */
#define SHMF_VERSION 1u
#define SHMF_DATA_ALIGN 4096u    /* slot data starts page aligned */
#define SHMF_REPORT_BYTES 8192u  /* per-slot error report (pickled by Python) */
#define SHMF_GEN_TABLE 64u       /* epoch parameters kept for this many generations */
#define SHMF_NO_CLAIM UINT64_MAX

typedef enum {
    SHMF_FREE = 0,
    SHMF_FILLING = 1,
    SHMF_READY = 2,
    SHMF_HELD = 3,
    SHMF_ERROR = 4,
} shmf_slot_state;

typedef enum {
    SHMF_OK = 0,
    SHMF_TIMEOUT = 1,     /* the wait ran out; the caller checks liveness and retries */
    SHMF_STALE = 2,       /* a newer epoch started; drop what you were doing */
    SHMF_SHUTDOWN = 3,    /* the loader is closing */
    SHMF_EPOCH_DONE = 4,  /* every batch of this epoch has been claimed */
    SHMF_BLOCKED = 5,     /* the slot the consumer needs is held by the consumer itself */
    SHMF_INTERRUPTED = 6, /* a signal arrived during a wait (EINTR) */
    SHMF_EINVAL = -1,     /* bad argument or corrupt block */
} shmf_status;

typedef struct {
    uint64_t epoch;
    uint64_t n_batches;
    uint64_t slot_base; /* batch b of this generation lives in slot (slot_base + b) % n_slots */
} shmf_gen_info;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t n_slots;
    uint32_t max_workers;
    uint32_t _pad0;
    uint64_t slot_bytes;
    uint64_t data_offset;
    uint64_t total_bytes;
    _Alignas(64) _Atomic uint64_t claim;    /* gen << 32 | next batch */
    _Alignas(64) _Atomic uint32_t gen;      /* futex word: bumped at each epoch start */
    _Atomic uint32_t gen_waiters;
    _Atomic uint32_t shutdown;              /* futex word too: wakes every waiter */
    _Atomic uint32_t fatal;                 /* set once by the supervisor; message in fatal area */
    _Atomic uint64_t restarts;              /* workers replaced so far */
    _Atomic uint64_t consumer_tag;          /* tag of the batch the consumer waits for next */
    shmf_gen_info gens[SHMF_GEN_TABLE];
} shmf_header;

typedef struct {
    _Alignas(64) _Atomic uint64_t claim;    /* tag being claimed/built, or SHMF_NO_CLAIM */
    _Atomic uint64_t busy_ns;               /* time spent building batches */
    _Atomic uint64_t batches;               /* batches published */
    _Atomic int32_t pid;
} shmf_worker;

typedef struct {
    _Alignas(64) _Atomic uint32_t state;    /* shmf_slot_state; futex word */
    _Atomic uint32_t waiters;
    _Atomic uint64_t tag;                   /* gen << 32 | batch */
    _Atomic int32_t owner;                  /* worker index while FILLING, -1 otherwise */
    uint32_t _pad;
    _Atomic uint64_t rows;                  /* rows actually written (short last batch) */
} shmf_slot;

static inline uint32_t shmf_slot_of(const shmf_header *h, uint32_t gen, uint32_t batch) {
    return (uint32_t)((h->gens[gen % SHMF_GEN_TABLE].slot_base + batch) % h->n_slots);
}

static inline uint64_t shmf_tag(uint32_t gen, uint32_t batch) {
    return ((uint64_t)gen << 32) | batch;
}

/* Offsets inside the mapping.  Slot data starts at shmf_data_offset, page aligned. */
size_t shmf_report_offset(uint32_t n_slots, uint32_t max_workers, uint32_t slot);
size_t shmf_fatal_offset(uint32_t n_slots, uint32_t max_workers);
size_t shmf_data_offset(uint32_t n_slots, uint32_t max_workers);

shmf_status shmf_init(void *base, size_t total_bytes, uint32_t n_slots, uint32_t max_workers,
                      uint64_t slot_bytes);
shmf_status shmf_check(const void *base, size_t total_bytes);

/* Consumer: open a new epoch (generation).  Returns the new generation. */
uint32_t shmf_start_epoch(void *base, uint64_t epoch, uint64_t n_batches, uint64_t slot_base);

/* Worker: claim the next batch of the current epoch. */
shmf_status shmf_claim(void *base, uint32_t worker, uint32_t *gen, uint64_t *epoch,
                       uint32_t *batch);
/* Worker: wait until the generation differs from `gen` (or timeout/shutdown). */
shmf_status shmf_wait_gen(void *base, uint32_t gen, double timeout_s);
/* Worker: wait for the batch's slot to be FREE and take it (FILLING). */
shmf_status shmf_acquire(void *base, uint32_t worker, uint32_t gen, uint32_t batch,
                         double timeout_s);
/* Worker: finish a slot taken with shmf_acquire (state READY or ERROR). */
shmf_status shmf_publish(void *base, uint32_t worker, uint32_t gen, uint32_t batch,
                         uint64_t rows, uint32_t state, uint64_t busy_ns);

/* Consumer: wait for batch `batch` of generation `gen`; on SHMF_OK *state is READY or
 * ERROR and the slot is now HELD by the consumer. */
shmf_status shmf_take(void *base, uint32_t gen, uint32_t batch, double timeout_s,
                      uint32_t *state, uint64_t *rows);
/* Consumer: give a HELD slot back; a no-op when the tag no longer matches. */
shmf_status shmf_release(void *base, uint32_t slot, uint64_t tag);

/* Supervisor, after reaping worker `worker`: put back what it left half done.
 * *pending is the tag it had claimed and not published, or SHMF_NO_CLAIM. */
shmf_status shmf_reclaim(void *base, uint32_t worker, uint64_t *pending);
/* Supervisor, for a replacement worker: hand it the claim of its predecessor. */
shmf_status shmf_set_claim(void *base, uint32_t worker, uint64_t tag);

shmf_status shmf_shutdown(void *base);
/* Consumer, after every process of a pool has exited: allow a new pool to run. */
shmf_status shmf_reopen(void *base);
/* Supervisor: record a fatal condition (message already written in the fatal area). */
shmf_status shmf_set_fatal(void *base);

static inline shmf_header *shmf_hdr(void *base) { return (shmf_header *)base; }
static inline shmf_worker *shmf_workers(void *base) {
    return (shmf_worker *)((char *)base + sizeof(shmf_header));
}
static inline shmf_slot *shmf_slots(void *base) {
    shmf_header *h = shmf_hdr(base);
    return (shmf_slot *)((char *)base + sizeof(shmf_header) + sizeof(shmf_worker) * h->max_workers);
}

#endif
