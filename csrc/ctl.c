/*
 * shmfeed control plane: lock-free slot transitions and futex waits on a shared
 * mapping.  See shmfeed_ctl.h for the layout and the slot life cycle.
 *
 * Why no locks: a worker can be SIGKILLed at any instruction.  Every transition a
 * worker makes is one atomic store or compare-and-swap, so the only thing a dead
 * worker can leave behind is a slot in FILLING and a claim record, both repaired by
 * shmf_reclaim.  Slot assignment (FREE -> ASSIGNING -> ASSIGNED) runs only in the
 * training process, whose death ends everything anyway.
 *
 * Why waiter counters: futex_wake is a system call; publishing thousands of small
 * batches per second should not pay for it when nobody sleeps on the word.  Waiter
 * and waker both use sequentially consistent operations (increment waiters, re-read
 * the word / store the word, read waiters), so a wake-up can never be lost.
 *
 * Why batched wake-ups: when the workers are ahead, the ring is full of ready batches
 * and the workers sleep in shmf_claim_wait until the next batch has a slot.  Waking
 * them at every release costs a context switch per batch on each side, and on a
 * machine with few cores a woken worker takes the CPU the training loop was about
 * to use.  So a release that assigns a slot while workers sleep wakes nobody until
 * the batches waiting for a builder (unclaimed) reach wake_threshold, and then ONE
 * worker, which claims and builds them in turn (a worker asleep holds no claim, so
 * any one will do).  More are woken by the consumer (flush_assign, in shmf_take):
 * one more each time it must sleep while that many batches still wait for a builder
 * (the workers awake are behind), every sleeper when the batch it waits for has no
 * builder at all; and all by any other assignment (epoch start, abandon, reclaim).
 * When a worker waits in shmf_acquire for its own batch's slot (stream shards, a
 * rebuilt claim), releases are counted (assign_deferred) and a threshold of them
 * wakes all: one woken at random might not be that one, and the consumer wakes all
 * too before it waits.  A worker never misses a slot assigned before it sleeps
 * (assign_seq changes at every assignment), and a deferred wake-up only delays one
 * asleep: its wait is a bounded slice after which it looks again.  The consumer,
 * likewise, is woken only by the publication of the batch it waits for, of a batch
 * that frees a slot, or of a release.
 *
 * Measured (arrays of 32x512 int32 rows, 2 workers, 2 cores, 8 slots, medians of 4
 * alternating runs): with every worker woken per threshold and claims made before
 * the slot, 0.46x in-process `x[idx]`; with one woken, 0.72-0.90x.  A consumer that must
 * sleep while batches wait for a builder wakes one more (flush_assign): without it,
 * a per-sample source (hundreds of us a batch) ran on one worker, the other asleep
 * for its whole slice.
 */
#define _GNU_SOURCE
#include "shmfeed_ctl.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

size_t shmf_report_offset(uint32_t n_slots, uint32_t max_workers, uint32_t slot) {
    size_t base = sizeof(shmf_header) + sizeof(shmf_worker) * (size_t)max_workers +
                  (sizeof(shmf_slot) + sizeof(shmf_assign)) * (size_t)n_slots;
    return round_up(base, 64) + (size_t)SHMF_REPORT_BYTES * slot;
}

size_t shmf_fatal_offset(uint32_t n_slots, uint32_t max_workers) {
    return shmf_report_offset(n_slots, max_workers, n_slots);
}

size_t shmf_data_offset(uint32_t n_slots, uint32_t max_workers) {
    return round_up(shmf_fatal_offset(n_slots, max_workers) + SHMF_REPORT_BYTES, SHMF_DATA_ALIGN);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Callers pass any double: NaN and negatives mean "do not wait", and a wait is capped
 * so that converting it to a timespec is always defined. */
#define MAX_WAIT_S 1e6
static double clamp_timeout(double timeout_s) {
    if (!(timeout_s > 0)) return 0;
    return timeout_s < MAX_WAIT_S ? timeout_s : MAX_WAIT_S;
}

/* Sleep on a shared futex word while it equals `expected`, at most `timeout_s`.
 * Returns 0 when woken or the value changed, ETIMEDOUT, or EINTR. */
static int futex_wait(_Atomic uint32_t *word, _Atomic uint32_t *waiters, uint32_t expected,
                      double timeout_s) {
    timeout_s = clamp_timeout(timeout_s);
    if (timeout_s <= 0) return ETIMEDOUT;
    struct timespec ts;
    ts.tv_sec = (time_t)timeout_s;
    ts.tv_nsec = (long)((timeout_s - (double)ts.tv_sec) * 1e9);
    int rc = 0;
    atomic_fetch_add(waiters, 1);
    if (atomic_load(word) == expected) {
        /* FUTEX_WAIT, not the private variant: the word is in a MAP_SHARED mapping
         * that other processes wait on too. */
        long r = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
        if (r == -1 && (errno == ETIMEDOUT || errno == EINTR)) rc = errno;
    }
    atomic_fetch_sub(waiters, 1);
    return rc;
}

/* Wake up to `count` processes asleep on `word` (INT_MAX: all of them). */
static void futex_wake_n(_Atomic uint32_t *word, _Atomic uint32_t *waiters, int force, int count) {
    if (force || atomic_load(waiters) > 0)
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, count, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word, _Atomic uint32_t *waiters, int force) {
    futex_wake_n(word, waiters, force, INT_MAX);
}

/* Something the consumer may be waiting for happened. */
static void bump_progress(shmf_header *h) {
    atomic_fetch_add(&h->progress, 1);
    futex_wake(&h->progress, &h->progress_waiters, 0);
}

/* Something a worker may be waiting for happened (a slot was assigned). */
static void bump_assign(shmf_header *h) {
    atomic_fetch_add(&h->assign_seq, 1);
    atomic_store(&h->assign_deferred, 0);
    futex_wake(&h->assign_seq, &h->assign_waiters, 0);
}

/* Released slots that wait for a sleeping worker before it is woken: half the ring,
 * so that each wake-up gives the workers several batches to build in a row. */
static uint32_t wake_threshold(const shmf_header *h) { return h->n_slots / 2 ? h->n_slots / 2 : 1; }

/* Batches that have a slot and no builder yet: what a worker woken now would find. */
static uint32_t unclaimed(shmf_header *h) {
    uint64_t c = atomic_load(&h->claim), a = atomic_load(&h->assign_next);
    return (a >> 32) == (c >> 32) && a > c ? (uint32_t)(a - c) : 0;
}

/* `assigned` slots were assigned by a release: wake a sleeping worker only once
 * enough wait for one, and then just one (see the top of this file). */
static void bump_assign_deferred(shmf_header *h, uint32_t assigned) {
    atomic_fetch_add(&h->assign_seq, 1);
    if (atomic_load(&h->assign_waiters) == 0) return; /* whoever looks next sees them */
    uint32_t threshold = wake_threshold(h);
    if (atomic_load(&h->assign_waiters) > atomic_load(&h->claim_waiters)) {
        /* Someone waits in shmf_acquire for its own batch's slot: wake them all. */
        if (atomic_fetch_add(&h->assign_deferred, assigned) + assigned >= threshold) bump_assign(h);
        return;
    }
    /* Only when the count crosses the threshold: above it, the worker woken at the
     * crossing is on its way, and a second one is woken only if the count drops
     * below and crosses again (the first one fell behind). */
    uint32_t u = unclaimed(h);
    if (u >= threshold && u - assigned < threshold) futex_wake_n(&h->assign_seq, &h->assign_waiters, 0, 1);
}

/* The consumer is about to wait for a batch whose slot is in `state`.  Wake every
 * sleeping worker if wake-ups were deferred, or if the batch waits for a builder
 * while workers sleep (the one woken alone is busy, stopped or dead).  Otherwise, a
 * consumer that has to wait means the workers awake are behind: if enough batches
 * wait for a builder, wake one more (a release wakes one only when that count
 * crosses the threshold, and behind, it stays above it). */
static void flush_assign(shmf_header *h, uint32_t state, int sleeping) {
    if (atomic_load(&h->assign_deferred) ||
        (state == SHMF_ASSIGNED && atomic_load(&h->assign_waiters)))
        bump_assign(h);
    else if (sleeping && atomic_load(&h->claim_waiters) && unclaimed(h) >= wake_threshold(h))
        futex_wake_n(&h->assign_seq, &h->assign_waiters, 0, 1);
}

/* How long the consumer spins, rather than sleeps, for a batch it sees being built:
 * a small batch is written in microseconds, less than a futex sleep and wake-up
 * cost the two processes (measured: 32x512 int32 rows, 2 workers on 2 cores,
 * 34k -> 36k batches/s, median of 6; without it, arrays-tokens fell from 0.85x to
 * 0.72x of in-process).  Bounded, only while the slot is FILLING, and only when
 * batches take at most that long to build on average (spin_worth_it): a batch of
 * 200 us would rarely finish within the spin, which then only takes a CPU from the
 * workers (per-sample tokens on 2 cores: the consumer burnt 42 us a batch). */
#define SPIN_S 30e-6

/* Whether batches are built in SPIN_S or less on average, so far (yes before any). */
static int spin_worth_it(void *base) {
    shmf_header *h = shmf_hdr(base);
    shmf_worker *ws = shmf_workers(base);
    uint64_t busy_ns = 0, batches = 0;
    for (uint32_t i = 0; i < h->max_workers; i++) {
        busy_ns += atomic_load(&ws[i].busy_ns);
        batches += atomic_load(&ws[i].batches);
    }
    return (double)busy_ns <= SPIN_S * 1e9 * (double)batches;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint32_t current_gen(shmf_header *h) { return (uint32_t)(atomic_load(&h->claim) >> 32); }

/* True when the consumer has moved past `tag` (a later batch, or a newer epoch). */
static int consumer_passed(shmf_header *h, uint64_t tag) {
    return atomic_load(&h->consumer_tag) > tag;
}

shmf_status shmf_init(void *base, size_t total_bytes, uint32_t n_slots, uint32_t max_workers,
                      uint64_t slot_bytes) {
    if (!base || n_slots == 0 || slot_bytes == 0) return SHMF_EINVAL;
    size_t data = shmf_data_offset(n_slots, max_workers);
    if (slot_bytes > (SIZE_MAX - data) / n_slots) return SHMF_EINVAL;
    if (data + (size_t)slot_bytes * n_slots > total_bytes) return SHMF_EINVAL;
    /* The control part only: report areas are read only after a report was written
     * into them, and zeroing them would touch 8 KiB per slot of a fresh mapping. */
    memset(base, 0, shmf_report_offset(n_slots, max_workers, 0));
    shmf_header *h = shmf_hdr(base);
    h->version = SHMF_VERSION;
    h->n_slots = n_slots;
    h->max_workers = max_workers;
    h->slot_bytes = slot_bytes;
    h->data_offset = data;
    h->total_bytes = total_bytes;
    shmf_worker *w = shmf_workers(base);
    for (uint32_t i = 0; i < max_workers; i++) atomic_store(&w[i].claim, SHMF_NO_CLAIM);
    shmf_slot *s = shmf_slots(base);
    shmf_assign *a = shmf_assigns(base);
    for (uint32_t i = 0; i < n_slots; i++) {
        atomic_store(&s[i].owner, -1);
        atomic_store(&s[i].tag, SHMF_NO_CLAIM);
        atomic_store(&a[i].tag, SHMF_NO_CLAIM);
        atomic_store(&a[i].slot, SHMF_NO_SLOT);
    }
    /* No generation is open yet: generation 0 is an empty epoch. */
    atomic_store(&h->claim, 0);
    atomic_store(&h->assign_next, 0);
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = SHMF_MAGIC; /* written last: a block with the magic is complete */
    return SHMF_OK;
}

shmf_status shmf_check(const void *base, size_t total_bytes) {
    const shmf_header *h = (const shmf_header *)base;
    if (!base || total_bytes < sizeof(shmf_header)) return SHMF_EINVAL;
    if (h->magic != SHMF_MAGIC || h->version != SHMF_VERSION) return SHMF_EINVAL;
    if (h->total_bytes != total_bytes) return SHMF_EINVAL;
    if (h->data_offset != shmf_data_offset(h->n_slots, h->max_workers)) return SHMF_EINVAL;
    return SHMF_OK;
}

/* Returns how many slots it assigned; `defer`: the caller batches the wake-up. */
static uint32_t assign_free(void *base, int defer) {
    shmf_header *h = shmf_hdr(base);
    shmf_slot *slots = shmf_slots(base);
    shmf_assign *table = shmf_assigns(base);
    uint32_t n = h->n_slots;
    uint64_t ctag = atomic_load(&h->consumer_tag);
    uint32_t start = (uint32_t)(h->gens[(uint32_t)(ctag >> 32) % SHMF_GEN_TABLE].slot_base % n);
    /* 1. Batches nobody will take: an abandoned epoch's, or a duplicate of one
     *    already delivered (left by a dead worker's ambiguous claim). */
    for (uint32_t i = 0; i < n; i++) {
        shmf_slot *s = &slots[i];
        uint32_t st = atomic_load(&s->state);
        if (st != SHMF_READY && st != SHMF_ERROR && st != SHMF_ASSIGNED) continue;
        if (atomic_load(&s->tag) >= ctag) continue;
        atomic_compare_exchange_strong(&s->state, &st, SHMF_FREE);
    }
    /* 2. Every free slot goes to the next batch number, in order, skipping numbers
     *    the consumer has passed without taking them (a sharded stream's ended
     *    shards): nobody will take those. */
    uint32_t assigned = 0;
    for (uint32_t k = 0; k < n; k++) {
        shmf_slot *s = &slots[(start + k) % n];
        uint32_t st = SHMF_FREE;
        /* A load first: a compare-and-swap takes the slot's cache line exclusive even
         * when it fails, and the workers write those lines (a release scans them all). */
        if (atomic_load_explicit(&s->state, memory_order_relaxed) != SHMF_FREE ||
            !atomic_compare_exchange_strong(&s->state, &st, SHMF_ASSIGNING))
            continue;
        uint64_t a;
        for (;;) {
            a = atomic_load(&h->assign_next);
            const shmf_gen_info *info = &h->gens[(uint32_t)(a >> 32) % SHMF_GEN_TABLE];
            if ((a >> 32) == 0 || (uint32_t)a >= info->n_batches) {
                atomic_store(&s->state, SHMF_FREE); /* the epoch has no batch left */
                goto done;
            }
            if (atomic_compare_exchange_strong(&h->assign_next, &a, a + 1) && a >= ctag) break;
        }
        atomic_store(&s->tag, a);
        atomic_store(&s->rows, 0);
        atomic_store(&s->state, SHMF_ASSIGNED);
        shmf_assign *e = &table[(uint32_t)a % n];
        atomic_store(&e->slot, (uint32_t)(s - slots));
        atomic_store(&e->tag, a); /* last: a reader that sees the tag sees the slot */
        assigned++;
    }
done:
    if (assigned && defer)
        bump_assign_deferred(h, assigned);
    else if (assigned)
        bump_assign(h);
    return assigned;
}

void shmf_assign_free(void *base) { assign_free(base, 0); }

uint32_t shmf_slot_of(void *base, uint32_t gen, uint32_t batch) {
    shmf_header *h = shmf_hdr(base);
    shmf_assign *e = &shmf_assigns(base)[batch % h->n_slots];
    if (atomic_load(&e->tag) != shmf_tag(gen, batch)) return SHMF_NO_SLOT;
    uint32_t slot = atomic_load(&e->slot);
    /* The entry could be reused between the two loads; the slot's own tag decides. */
    if (slot >= h->n_slots || atomic_load(&shmf_slots(base)[slot].tag) != shmf_tag(gen, batch))
        return SHMF_NO_SLOT;
    return slot;
}

uint32_t shmf_start_epoch(void *base, uint64_t epoch, uint64_t key, uint64_t first_batch,
                          uint64_t n_batches, uint64_t slot_base) {
    shmf_header *h = shmf_hdr(base);
    uint32_t g = atomic_load(&h->gen) + 1;
    h->gens[g % SHMF_GEN_TABLE].epoch = epoch;
    h->gens[g % SHMF_GEN_TABLE].key = key;
    h->gens[g % SHMF_GEN_TABLE].first_batch = first_batch;
    h->gens[g % SHMF_GEN_TABLE].n_batches = n_batches;
    h->gens[g % SHMF_GEN_TABLE].slot_base = slot_base;
    /* seq_cst stores: a worker that reads the new claim word sees the table entry. */
    atomic_store(&h->consumer_tag, shmf_tag(g, 0));
    atomic_store(&h->assign_next, shmf_tag(g, 0));
    atomic_store(&h->claim, shmf_tag(g, 0));
    atomic_store(&h->gen, g);
    futex_wake(&h->gen, &h->gen_waiters, 0);
    shmf_assign_free(base);
    return g;
}

/* One try at claiming the next batch of the current epoch.  SHMF_OK: *batch is ours;
 * SHMF_EPOCH_DONE; SHMF_BLOCKED: `need_slot` and the batch has no slot yet; SHMF_STALE:
 * another worker claimed it first (try again). */
static shmf_status try_claim(shmf_header *h, shmf_worker *w, int need_slot, uint32_t *gen,
                             uint64_t *epoch, uint32_t *batch) {
    uint64_t c = atomic_load(&h->claim);
    uint32_t g = (uint32_t)(c >> 32), b = (uint32_t)c;
    const shmf_gen_info *info = &h->gens[g % SHMF_GEN_TABLE];
    *gen = g;
    *epoch = info->epoch;
    if (g == 0 || b >= info->n_batches) return SHMF_EPOCH_DONE;
    /* Batch b has a slot once the assignment word is past it (a newer generation
     * counts too: the claim below then fails, or is of a batch acquire finds stale). */
    if (need_slot && atomic_load(&h->assign_next) <= c) return SHMF_BLOCKED;
    /* Record the intent first: if we die after the CAS, shmf_reclaim finds it. */
    atomic_store(&w->claim, c);
    if (!atomic_compare_exchange_strong(&h->claim, &c, c + 1)) return SHMF_STALE;
    *batch = b;
    return SHMF_OK;
}

shmf_status shmf_claim(void *base, uint32_t worker, uint32_t *gen, uint64_t *epoch,
                       uint32_t *batch) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    shmf_worker *w = &shmf_workers(base)[worker];
    for (;;) {
        if (atomic_load(&h->shutdown)) return SHMF_SHUTDOWN;
        shmf_status st = try_claim(h, w, 0, gen, epoch, batch);
        if (st != SHMF_STALE) return st;
    }
}

shmf_status shmf_claim_wait(void *base, uint32_t worker, double timeout_s, uint32_t *gen,
                            uint64_t *epoch, uint32_t *batch) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    shmf_worker *w = &shmf_workers(base)[worker];
    double deadline = now_s() + clamp_timeout(timeout_s);
    for (;;) {
        if (atomic_load(&h->shutdown)) return SHMF_SHUTDOWN;
        uint32_t seq = atomic_load(&h->assign_seq); /* before looking: no wake-up is lost */
        shmf_status st = try_claim(h, w, 1, gen, epoch, batch);
        if (st == SHMF_STALE) continue;
        if (st != SHMF_BLOCKED) return st;
        double left_s = deadline - now_s();
        if (left_s <= 0) return SHMF_TIMEOUT;
        atomic_fetch_add(&h->claim_waiters, 1);
        int rc = futex_wait(&h->assign_seq, &h->assign_waiters, seq, left_s);
        atomic_fetch_sub(&h->claim_waiters, 1);
        if (rc == EINTR) return SHMF_INTERRUPTED;
    }
}

shmf_status shmf_wait_gen(void *base, uint32_t gen, double timeout_s) {
    shmf_header *h = shmf_hdr(base);
    double deadline = now_s() + clamp_timeout(timeout_s);
    for (;;) {
        if (atomic_load(&h->shutdown)) return SHMF_SHUTDOWN;
        if (atomic_load(&h->gen) != gen) return SHMF_OK;
        int rc = futex_wait(&h->gen, &h->gen_waiters, gen, deadline - now_s());
        if (rc == EINTR) return SHMF_INTERRUPTED;
        if (rc == ETIMEDOUT && atomic_load(&h->gen) == gen) return SHMF_TIMEOUT;
    }
}

shmf_status shmf_acquire(void *base, uint32_t worker, uint32_t gen, uint32_t batch,
                         double timeout_s, uint32_t *slot_out) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    uint64_t tag = shmf_tag(gen, batch);
    double deadline = now_s() + clamp_timeout(timeout_s);
    for (;;) {
        if (atomic_load(&h->shutdown)) return SHMF_SHUTDOWN;
        if (current_gen(h) != gen || consumer_passed(h, tag)) return SHMF_STALE;
        uint32_t seq = atomic_load(&h->assign_seq);
        uint32_t slot = shmf_slot_of(base, gen, batch);
        double wait_s = deadline - now_s();
        if (slot != SHMF_NO_SLOT) {
            shmf_slot *s = &shmf_slots(base)[slot];
            /* The owner word is taken first, by compare-and-swap, and dropped last (in
             * shmf_publish): whatever instruction a worker dies at, every slot it
             * touched still names it, so shmf_reclaim can put it back. */
            int32_t owner = -1;
            if (atomic_load(&s->state) == SHMF_ASSIGNED &&
                atomic_compare_exchange_strong(&s->owner, &owner, (int32_t)worker)) {
                uint32_t st = SHMF_ASSIGNED;
                if (atomic_compare_exchange_strong(&s->state, &st, SHMF_FILLING)) {
                    if (atomic_load(&s->tag) == tag) {
                        *slot_out = slot;
                        return SHMF_OK;
                    }
                    /* Reassigned between our look-up and the CAS: give it back. */
                    atomic_store(&s->state, SHMF_ASSIGNED);
                    atomic_store(&s->owner, -1);
                    bump_assign(h);
                    continue;
                }
                atomic_store(&s->owner, -1);
            } else if (owner != -1 && atomic_load(&s->state) == SHMF_ASSIGNED && wait_s > 1e-3) {
                /* Owned but not being built: a publisher about to let go, or a dead
                 * worker about to be reclaimed.  Neither bumps assign_seq, so poll. */
                wait_s = 1e-3;
            }
            /* Otherwise someone else builds this batch (a duplicate claim): wait
             * until the consumer passes it. */
        }
        int rc = futex_wait(&h->assign_seq, &h->assign_waiters, seq, wait_s);
        if (rc == EINTR) return SHMF_INTERRUPTED;
        if (now_s() >= deadline) return SHMF_TIMEOUT;
    }
}

shmf_status shmf_publish(void *base, uint32_t worker, uint32_t slot, uint32_t gen,
                         uint32_t batch, uint64_t rows, uint32_t state, uint64_t busy_ns) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers || slot >= h->n_slots ||
        (state != SHMF_READY && state != SHMF_ERROR))
        return SHMF_EINVAL;
    uint64_t tag = shmf_tag(gen, batch);
    shmf_slot *s = &shmf_slots(base)[slot];
    shmf_worker *w = &shmf_workers(base)[worker];
    if (atomic_load(&s->state) != SHMF_FILLING || atomic_load(&s->owner) != (int32_t)worker ||
        atomic_load(&s->tag) != tag)
        return SHMF_EINVAL;
    atomic_store(&s->rows, rows);
    atomic_fetch_add(&w->busy_ns, busy_ns);
    atomic_fetch_add(&w->batches, 1);
    /* A batch of an abandoned epoch is not worth a slot: free it at once. */
    int stale = current_gen(h) != gen || consumer_passed(h, tag);
    atomic_store(&s->state, stale ? SHMF_FREE : state);
    /* Last (see shmf_acquire): dying before this line leaves the slot named by us. */
    atomic_store(&s->owner, -1);
    atomic_store(&w->claim, SHMF_NO_CLAIM);
    /* The consumer sleeps only for the batch it takes next (consumer_tag, stored
     * before it looks at the slot), or for a slot when its batch has none (a stale
     * batch frees one).  Other batches only bump the word: a consumer about to
     * sleep on it then looks again instead. */
    if (stale || tag == atomic_load(&h->consumer_tag))
        bump_progress(h);
    else
        atomic_fetch_add(&h->progress, 1);
    return SHMF_OK;
}

shmf_status shmf_take(void *base, uint32_t gen, uint32_t batch, double timeout_s,
                      uint32_t *state, uint64_t *rows, uint32_t *slot_out) {
    shmf_header *h = shmf_hdr(base);
    shmf_slot *slots = shmf_slots(base);
    uint64_t want = shmf_tag(gen, batch);
    double deadline = now_s() + clamp_timeout(timeout_s);
    double spin_until = 0; /* set once the batch is seen being built */
    atomic_store(&h->consumer_tag, want);
    for (;;) {
        /* A pool that gave up (fatal) also shuts down, but the batches it published
         * before the one it failed on are still delivered, in order: fatal is checked
         * before sleeping, below. */
        if (atomic_load(&h->shutdown) && !atomic_load(&h->fatal)) return SHMF_SHUTDOWN;
        uint32_t seq = atomic_load(&h->progress);
        uint32_t slot = shmf_slot_of(base, gen, batch);
        if (slot == SHMF_NO_SLOT) {
            shmf_assign_free(base);
            slot = shmf_slot_of(base, gen, batch);
        }
        if (slot != SHMF_NO_SLOT) {
            shmf_slot *s = &slots[slot];
            uint32_t st = atomic_load(&s->state);
            if ((st == SHMF_READY || st == SHMF_ERROR) &&
                atomic_compare_exchange_strong(&s->state, &st, SHMF_HELD)) {
                *state = st;
                *rows = atomic_load(&s->rows);
                *slot_out = slot;
                atomic_store(&h->consumer_tag, want + 1);
                return SHMF_OK;
            }
        } else {
            /* No slot for this batch: if every slot is held by the consumer itself,
             * waiting cannot help. */
            uint32_t held = 0;
            for (uint32_t i = 0; i < h->n_slots; i++)
                held += atomic_load(&slots[i].state) == SHMF_HELD;
            if (held == h->n_slots) return SHMF_BLOCKED;
        }
        if (now_s() < spin_until) {
            cpu_relax();
            continue;
        }
        /* Once before spinning and before each sleep: whoever the releases left asleep
         * builds what this process waits for (one more worker only if it must sleep:
         * a batch written within the spin says the workers awake keep up). */
        uint32_t st = slot != SHMF_NO_SLOT ? atomic_load(&slots[slot].state) : SHMF_FREE;
        int spin = spin_until == 0 && st == SHMF_FILLING && spin_worth_it(base);
        flush_assign(h, st, !spin);
        if (spin) {
            spin_until = now_s() + SPIN_S;
            continue;
        }
        /* Checked only before sleeping: batches that are ready are still delivered. */
        if (atomic_load(&h->fatal)) return SHMF_SHUTDOWN;
        /* Only after the slot was looked at: a process stopped past its deadline
         * (SIGSTOP, a debugger) takes a batch that became ready meanwhile. */
        double left_s = deadline - now_s();
        if (left_s <= 0) return SHMF_TIMEOUT;
        int rc = futex_wait(&h->progress, &h->progress_waiters, seq, left_s);
        if (rc == EINTR) return SHMF_INTERRUPTED;
    }
}

shmf_status shmf_release(void *base, uint32_t slot, uint64_t tag) {
    shmf_header *h = shmf_hdr(base);
    if (slot >= h->n_slots) return SHMF_EINVAL;
    shmf_slot *s = &shmf_slots(base)[slot];
    if (atomic_load(&s->tag) != tag) return SHMF_STALE;
    uint32_t expected = SHMF_HELD;
    if (!atomic_compare_exchange_strong(&s->state, &expected, SHMF_FREE)) return SHMF_STALE;
    /* Hand it to the next batch now, so a worker can start while the step runs
     * (one that looks finds it; one asleep is woken with the next few). */
    assign_free(base, 1);
    bump_progress(h);
    return SHMF_OK;
}

shmf_status shmf_reclaim(void *base, uint32_t worker, uint64_t *pending) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    shmf_worker *w = &shmf_workers(base)[worker];
    shmf_slot *slots = shmf_slots(base);
    *pending = SHMF_NO_CLAIM;
    /* Every slot that still names the dead worker is let go.  A half-written one
     * goes back to ASSIGNED with its tag: the replacement (or whoever claims the
     * batch) rebuilds it in place.  Any other state was already final when it died
     * (between shmf_publish's state store and its owner store, or inside
     * shmf_acquire before its state CAS): only the owner word is cleared. */
    int reset = 0;
    for (uint32_t i = 0; i < h->n_slots; i++) {
        shmf_slot *s = &slots[i];
        if (atomic_load(&s->owner) != (int32_t)worker) continue;
        uint32_t st = SHMF_FILLING;
        atomic_compare_exchange_strong(&s->state, &st, SHMF_ASSIGNED);
        atomic_store(&s->owner, -1);
        reset = 1;
    }
    if (reset) bump_assign(h);
    uint64_t c = atomic_exchange(&w->claim, SHMF_NO_CLAIM);
    if (c == SHMF_NO_CLAIM) return SHMF_OK;
    uint64_t now = atomic_load(&h->claim);
    /* Claimed only if the claim word moved past it in the same generation, and
     * nobody has finished it (it died between publishing and clearing its record). */
    if ((now >> 32) != (c >> 32) || (uint32_t)now <= (uint32_t)c) return SHMF_OK;
    if (consumer_passed(h, c)) return SHMF_OK;
    uint32_t slot = shmf_slot_of(base, (uint32_t)(c >> 32), (uint32_t)c);
    if (slot != SHMF_NO_SLOT) {
        uint32_t st = atomic_load(&slots[slot].state);
        if (st == SHMF_READY || st == SHMF_ERROR || st == SHMF_HELD) return SHMF_OK;
    }
    *pending = c;
    return SHMF_OK;
}

/* Move a gen << 32 | batch word to `to` unless it is already there or in another
 * generation. */
static void advance_to(_Atomic uint64_t *word, uint64_t to) {
    uint64_t c = atomic_load(word);
    while ((c >> 32) == (to >> 32) && c < to && !atomic_compare_exchange_weak(word, &c, to)) {
    }
}

void shmf_abandon(void *base, uint32_t gen) {
    shmf_header *h = shmf_hdr(base);
    if ((uint32_t)(atomic_load(&h->consumer_tag) >> 32) != gen) return;
    uint64_t n = h->gens[gen % SHMF_GEN_TABLE].n_batches;
    uint64_t end = shmf_tag(gen, n < UINT32_MAX ? (uint32_t)n : UINT32_MAX);
    /* The consumer is past every batch of the epoch: workers drop what they build
     * (STALE), a dead worker's claim is not rebuilt, and nothing more is claimed or
     * given a slot. */
    atomic_store(&h->consumer_tag, shmf_tag(gen, UINT32_MAX));
    advance_to(&h->claim, end);
    advance_to(&h->assign_next, end);
    shmf_assign_free(base); /* frees the epoch's READY, ERROR and ASSIGNED slots */
    bump_assign(h);         /* wakes workers waiting for a slot: they see STALE */
    bump_progress(h);
}

shmf_status shmf_set_claim(void *base, uint32_t worker, uint64_t tag) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    atomic_store(&shmf_workers(base)[worker].claim, tag);
    return SHMF_OK;
}

shmf_status shmf_shutdown(void *base) {
    shmf_header *h = shmf_hdr(base);
    atomic_store(&h->shutdown, 1);
    futex_wake(&h->gen, &h->gen_waiters, 1);
    futex_wake(&h->assign_seq, &h->assign_waiters, 1);
    futex_wake(&h->progress, &h->progress_waiters, 1);
    return SHMF_OK;
}

shmf_status shmf_reopen(void *base) {
    atomic_store(&shmf_hdr(base)->shutdown, 0);
    return SHMF_OK;
}

shmf_status shmf_set_fatal(void *base) {
    shmf_header *h = shmf_hdr(base);
    atomic_store(&h->fatal, 1);
    /* Wake the consumer wherever it sleeps so it reads the message promptly. */
    futex_wake(&h->progress, &h->progress_waiters, 1);
    return SHMF_OK;
}

shmf_status shmf_set_worker_pid(void *base, uint32_t worker, int32_t pid) {
    shmf_header *h = shmf_hdr(base);
    if (worker >= h->max_workers) return SHMF_EINVAL;
    atomic_store(&shmf_workers(base)[worker].pid, pid);
    return SHMF_OK;
}

shmf_status shmf_add_restart(void *base, uint64_t *restarts) {
    *restarts = atomic_fetch_add(&shmf_hdr(base)->restarts, 1) + 1;
    return SHMF_OK;
}
