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
 *   [shmf_header][shmf_worker x max_workers][shmf_slot x n_slots][shmf_assign x n_slots]
 *   [report area: SHMF_REPORT_BYTES x n_slots][fatal message: SHMF_REPORT_BYTES]
 *   ... padding to SHMF_DATA_ALIGN ...
 *   [slot 0 data: slot_bytes][slot 1 data] ...
 *
 * Slot life cycle (state word, also a futex word):
 *
 *   FREE --consumer assigns--> ASSIGNED --worker acquires--> FILLING --publish--> READY
 *     ^   (ASSIGNING in between)                                |                  |
 *     |                                                         +-> ERROR ---------+
 *     |                                                                            v
 *     +----------------- consumer release (last reference died) <------------- HELD
 *
 * Batches are numbered per epoch ("generation" g, bumped at every epoch start).
 * Slots are handed to batch numbers in order, by the training process only, as slots
 * become FREE: a batch the caller keeps simply pins its slot and the others keep
 * circulating.  The assignment table maps batch b to its slot at index b % n_slots;
 * at most n_slots batches are assigned and not yet taken, so an entry is reused only
 * after its batch was taken.  Claims (which worker builds which batch) come from one
 * 64-bit word (g << 32 | next batch), advanced by compare-and-swap after the worker
 * recorded what it is about to claim, so the claim of a worker that dies at any
 * point can be recovered.  A worker claims only a batch that has a slot
 * (shmf_claim_wait), so a worker asleep holds no claim and any one of them can build
 * the next batch.  Wake-ups are batched: a slot the consumer releases is assigned at
 * once (a worker that looks finds it), but a worker asleep waiting for one is woken
 * only once a few have been (ctl.c: wake_threshold), and then one worker, not all;
 * the consumer wakes one more when it must sleep while batches wait for a builder,
 * and every sleeper when the batch it waits for has none (ctl.c: flush_assign).
 */
#ifndef SHMFEED_CTL_H
#define SHMFEED_CTL_H

#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>

#define SHMF_MAGIC 0x31444545464d4853ULL /* the bytes "SHMFEED1" in memory (little-endian) */
#define SHMF_VERSION 6u
#define SHMF_DATA_ALIGN 4096u    /* slot data starts page aligned */
#define SHMF_REPORT_BYTES 8192u  /* per-slot error report (pickled by Python) */
#define SHMF_GEN_TABLE 64u       /* epoch parameters kept for this many generations */
#define SHMF_NO_CLAIM UINT64_MAX
#define SHMF_NO_SLOT UINT32_MAX

typedef enum {
    SHMF_FREE = 0,
    SHMF_FILLING = 1,
    SHMF_READY = 2,
    SHMF_HELD = 3,
    SHMF_ERROR = 4,
    SHMF_ASSIGNED = 5,   /* given to a batch number, waiting for its builder */
    SHMF_ASSIGNING = 6,  /* transient, inside shmf_assign_free */
} shmf_slot_state;

typedef enum {
    SHMF_OK = 0,
    SHMF_TIMEOUT = 1,     /* the wait ran out; the caller checks liveness and retries */
    SHMF_STALE = 2,       /* a newer epoch started, or the batch was delivered already */
    SHMF_SHUTDOWN = 3,    /* the loader is closing (or the pool gave up: see `fatal`) */
    SHMF_EPOCH_DONE = 4,  /* every batch of this epoch has been claimed */
    SHMF_BLOCKED = 5,     /* every slot is held by the consumer: nothing can be assigned */
    SHMF_INTERRUPTED = 6, /* a signal arrived during a wait (EINTR) */
    SHMF_EINVAL = -1,     /* bad argument or corrupt block */
} shmf_status;

typedef struct {
    uint64_t epoch;
    uint64_t first_batch; /* batch b of the generation is batch first_batch + b of the epoch */
    uint64_t n_batches;
    uint64_t slot_base; /* slot where the epoch's assignment scan starts (locality only) */
    uint64_t key;       /* the epoch order's key (order.h), for builders that compute it in C */
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
    _Alignas(64) _Atomic uint64_t claim;    /* gen << 32 | next batch to claim */
    _Alignas(64) _Atomic uint32_t gen;      /* futex word: bumped at each epoch start */
    _Atomic uint32_t gen_waiters;
    _Atomic uint32_t shutdown;
    _Atomic uint32_t fatal;                 /* set once by the supervisor; message in fatal area */
    _Atomic uint64_t restarts;              /* workers replaced so far */
    _Atomic uint64_t consumer_tag;          /* tag of the batch the consumer takes next */
    _Atomic uint64_t assign_next;           /* gen << 32 | next batch to give a slot */
    _Alignas(64) _Atomic uint32_t assign_seq; /* futex word for workers: bumped per assignment */
    _Atomic uint32_t assign_waiters;
    _Atomic uint32_t assign_deferred;       /* slots released and assigned, wake-up not sent */
    _Atomic uint32_t claim_waiters;         /* of assign_waiters, those in shmf_claim_wait */
    _Alignas(64) _Atomic uint32_t progress; /* futex word for the consumer: bumped per publish */
    _Atomic uint32_t progress_waiters;
    shmf_gen_info gens[SHMF_GEN_TABLE];
} shmf_header;

typedef struct {
    _Alignas(64) _Atomic uint64_t claim;    /* tag being claimed/built, or SHMF_NO_CLAIM */
    _Atomic uint64_t busy_ns;               /* time spent building batches */
    _Atomic uint64_t batches;               /* batches published */
    _Atomic int32_t pid;
} shmf_worker;

typedef struct {
    _Alignas(64) _Atomic uint32_t state;    /* shmf_slot_state (nobody sleeps on it) */
    uint32_t _pad0;
    _Atomic uint64_t tag;                   /* gen << 32 | batch it holds or is assigned */
    _Atomic int32_t owner;                  /* worker index from shmf_acquire's first step
                                             * to shmf_publish's last, -1 otherwise */
    uint32_t _pad;
    _Atomic uint64_t rows;                  /* rows actually written (short last batch) */
} shmf_slot;

typedef struct {
    _Atomic uint64_t tag;   /* batch this entry describes (written last) */
    _Atomic uint32_t slot;  /* its slot */
    uint32_t _pad;
} shmf_assign;

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

/* Consumer: open a new generation for batches first_batch .. first_batch + n_batches - 1
 * of `epoch` (first_batch > 0 resumes an epoch mid-way), whose order has key `key`,
 * and hand the free slots to its first batches.  Returns the new generation. */
uint32_t shmf_start_epoch(void *base, uint64_t epoch, uint64_t key, uint64_t first_batch,
                          uint64_t n_batches, uint64_t slot_base);

/* Claim the next batch of the current epoch, with or without a slot (the in-process
 * builder, which assigns slots itself). */
shmf_status shmf_claim(void *base, uint32_t worker, uint32_t *gen, uint64_t *epoch,
                       uint32_t *batch);
/* Worker: claim the next batch of the current epoch once it has a slot, waiting at
 * most `timeout_s` for one (SHMF_TIMEOUT: nothing claimed).  What workers use: a worker
 * asleep here holds no claim, so a release can wake just one of them. */
shmf_status shmf_claim_wait(void *base, uint32_t worker, double timeout_s, uint32_t *gen,
                            uint64_t *epoch, uint32_t *batch);
/* Worker: wait until the generation differs from `gen` (or timeout/shutdown). */
shmf_status shmf_wait_gen(void *base, uint32_t gen, double timeout_s);
/* Worker: wait until the batch has a slot and take it (ASSIGNED -> FILLING); *slot is
 * that slot, the worker's until it publishes. */
shmf_status shmf_acquire(void *base, uint32_t worker, uint32_t gen, uint32_t batch,
                         double timeout_s, uint32_t *slot);
/* Worker: finish the slot taken with shmf_acquire (state READY or ERROR).  By slot, not
 * by batch: the assignment table may already describe a newer epoch's batches when a
 * worker finishes a batch of an abandoned one, and that slot must still come back. */
shmf_status shmf_publish(void *base, uint32_t worker, uint32_t slot, uint32_t gen,
                         uint32_t batch, uint64_t rows, uint32_t state, uint64_t busy_ns);

/* Consumer: wait for batch `batch` of generation `gen`; on SHMF_OK *state is READY or
 * ERROR and the slot is now HELD by the consumer. */
shmf_status shmf_take(void *base, uint32_t gen, uint32_t batch, double timeout_s,
                      uint32_t *state, uint64_t *rows, uint32_t *slot);
/* Consumer: give a HELD slot back (and to the next batch); a no-op when the tag no
 * longer matches. */
shmf_status shmf_release(void *base, uint32_t slot, uint64_t tag);
/* Consumer: drop slots holding batches nobody will take, and give every free slot to
 * the next batch numbers.  Called by start/take/release; exposed for the in-process
 * builder. */
void shmf_assign_free(void *base);
/* Consumer: it will take no more batches of generation `gen` (the loop raised, timed
 * out or was left early): stop claims and assignments for it and free its slots
 * except those the consumer holds.  A no-op once a newer epoch started. */
void shmf_abandon(void *base, uint32_t gen);
/* The slot assigned to batch `batch` of `gen`, or SHMF_NO_SLOT. */
uint32_t shmf_slot_of(void *base, uint32_t gen, uint32_t batch);

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
/* Supervisor: record the pid of worker `worker` (for stats and for timeouts). */
shmf_status shmf_set_worker_pid(void *base, uint32_t worker, int32_t pid);
/* Supervisor: count one more replaced worker; *restarts is the new total. */
shmf_status shmf_add_restart(void *base, uint64_t *restarts);

static inline shmf_header *shmf_hdr(void *base) { return (shmf_header *)base; }
static inline shmf_worker *shmf_workers(void *base) {
    return (shmf_worker *)((char *)base + sizeof(shmf_header));
}
static inline shmf_slot *shmf_slots(void *base) {
    shmf_header *h = shmf_hdr(base);
    return (shmf_slot *)((char *)base + sizeof(shmf_header) + sizeof(shmf_worker) * h->max_workers);
}
static inline shmf_assign *shmf_assigns(void *base) {
    return (shmf_assign *)(shmf_slots(base) + shmf_hdr(base)->n_slots);
}

#endif
