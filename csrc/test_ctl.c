/*
 * Stress test of the control plane (ctl.c) on its own, without Python: the program
 * to build with -fsanitize=address,undefined (see .ci/sanitize.sh).
 *
 * The parent is the consumer and the supervisor; forked workers claim, acquire,
 * fill and publish batches.  Every slot is filled with a pattern derived from the
 * batch's tag, which the consumer checks, so a batch delivered twice, out of order,
 * torn or from the wrong slot fails the run.
 *
 * First, deterministic checks of batched wake-ups (check_deferred_wake, check_wake_one).
 * Phase 1 ("wake-ups"): no faults, and every wait has a long timeout.  A wait that
 * runs out means a wake-up was lost, and fails the run.  Every batch of every epoch
 * must be claimed exactly once.
 * Phase 2 ("faults"): the consumer SIGKILLs workers at random instants, reclaims
 * what they held and forks replacements that rebuild their claim; it also keeps
 * batches (pins slots) across steps and epochs, and abandons epochs halfway.
 * Delivery must stay exactly once and in order, no batch may be claimed twice, and
 * the run must never stall (no lock can be left held by a dead process).
 *
 * Exit status 0 on success; the first failed check prints what it saw and exits 1.
 * Usage: test_ctl [epochs_per_phase] [batches_per_epoch] (default 10 3000)
 */
#define _GNU_SOURCE
#include "shmfeed_ctl.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N_WORKERS 4
#define N_SLOTS 6
#define SLOT_BYTES 256
#define MAX_GENS 64
#define MAX_BATCHES 100000
#define LONG_WAIT_S 5.0   /* phase 1: a wait this long means a lost wake-up */
#define SHORT_WAIT_S 0.01 /* phase 2: the consumer supervises between waits */
#define STALL_S 10.0      /* no progress for this long is a hang */

/* Shared with the workers, next to the ring. */
typedef struct {
    _Atomic uint32_t claims[MAX_GENS][MAX_BATCHES / 8]; /* claims per (gen, batch) */
    _Atomic uint64_t timeouts;                         /* waits that ran out (phase 1) */
    _Atomic uint32_t phase;
    _Atomic uint64_t claimed; /* successful shmf_claim_wait calls */
} shared_t;

static void *base;
static shared_t *shared;
static uint32_t batches_per_epoch;
static pid_t pids[N_WORKERS];
static pid_t parent;
static uint64_t kills, restarts, rebuilt, abandons, delivered;
static int dying[N_WORKERS]; /* killed and not reaped yet */

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "test_ctl: FAILED: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    for (int i = 0; i < N_WORKERS; i++)
        if (pids[i] > 0) kill(pids[i], SIGKILL);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t pattern(uint64_t tag, uint32_t i) {
    return (tag + 1) * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)i << 17);
}

static uint64_t *slot_words(uint32_t slot) {
    return (uint64_t *)((char *)base + shmf_hdr(base)->data_offset + (size_t)slot * SLOT_BYTES);
}

static double wait_s(void) { return atomic_load(&shared->phase) == 1 ? LONG_WAIT_S : 0.2; }

/* ---- worker --------------------------------------------------------------------- */

static void build(uint32_t w, uint32_t gen, uint32_t batch) {
    uint32_t slot = SHMF_NO_SLOT;
    for (;;) {
        shmf_status st = shmf_acquire(base, w, gen, batch, wait_s(), &slot);
        if (st == SHMF_OK) break;
        if (st == SHMF_STALE) {
            shmf_set_claim(base, w, SHMF_NO_CLAIM);
            return;
        }
        if (st == SHMF_SHUTDOWN) _exit(0);
        if (st == SHMF_TIMEOUT) {
            if (atomic_load(&shared->phase) == 1) atomic_fetch_add(&shared->timeouts, 1);
            if (getppid() != parent) _exit(0);
            continue;
        }
        if (st != SHMF_INTERRUPTED) {
            fprintf(stderr, "test_ctl: worker %u: acquire returned %d\n", w, st);
            _exit(2);
        }
    }
    if (slot >= shmf_hdr(base)->n_slots) {
        fprintf(stderr, "test_ctl: worker %u: acquired batch %u has no slot\n", w, batch);
        _exit(2);
    }
    uint64_t *words = slot_words(slot);
    uint64_t tag = shmf_tag(gen, batch);
    for (uint32_t i = 0; i < SLOT_BYTES / 8; i++) words[i] = pattern(tag, i);
    shmf_status st = shmf_publish(base, w, slot, gen, batch, batch % 7 + 1, SHMF_READY, 1);
    if (st != SHMF_OK) {
        fprintf(stderr, "test_ctl: worker %u: publish of batch %u returned %d\n", w, batch, st);
        _exit(2);
    }
}

static void worker_main(uint32_t w, uint64_t pending) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(0);
    if (pending != SHMF_NO_CLAIM) /* the predecessor's claim (recorded by start_worker) */
        build(w, (uint32_t)(pending >> 32), (uint32_t)pending);
    for (;;) {
        uint32_t gen = 0, batch = 0;
        uint64_t epoch = 0;
        /* Odd workers claim at once and wait in shmf_acquire for the slot (as sharded
         * streams do), even ones wait to claim until the batch has a slot: both kinds
         * of sleeper, both kinds of wake-up, and kills with and without a claim. */
        shmf_status st = w % 2 ? shmf_claim(base, w, &gen, &epoch, &batch)
                               : shmf_claim_wait(base, w, wait_s(), &gen, &epoch, &batch);
        if (st == SHMF_SHUTDOWN) _exit(0);
        if (st == SHMF_TIMEOUT || st == SHMF_INTERRUPTED) {
            /* No lost wake-up either: with one worker woken per few releases, the
             * others may sleep as long as it keeps up (the consumer's waits tell). */
            if (getppid() != parent) _exit(0);
            continue;
        }
        if (st == SHMF_EPOCH_DONE) {
            st = shmf_wait_gen(base, gen, wait_s());
            if (st == SHMF_SHUTDOWN) _exit(0);
            if (st == SHMF_TIMEOUT && getppid() != parent) _exit(0);
            /* A timeout here is no lost wake-up: the consumer may be between epochs. */
            continue;
        }
        if (st != SHMF_OK) {
            fprintf(stderr, "test_ctl: worker %u: claim returned %d\n", w, st);
            _exit(2);
        }
        atomic_fetch_add(&shared->claimed, 1);
        if (gen < MAX_GENS && batch < MAX_BATCHES / 8) atomic_fetch_add(&shared->claims[gen][batch], 1);
        build(w, gen, batch);
    }
}

static void start_worker(uint32_t w, uint64_t pending) {
    /* Before the fork: a replacement killed before it runs must still leave the
     * claim where the next shmf_reclaim finds it. */
    shmf_set_claim(base, w, pending);
    pid_t pid = fork();
    if (pid < 0) fail("fork: %s", strerror(errno));
    if (pid == 0) worker_main(w, pending);
    pids[w] = pid;
    shmf_workers(base)[w].pid = pid;
}

/* ---- consumer / supervisor ----------------------------------------------------- */

/* Reap dead workers, reclaim what they held, start replacements. */
static void supervise(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        int w = -1;
        for (int i = 0; i < N_WORKERS; i++)
            if (pids[i] == pid) w = i;
        if (w < 0) continue;
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
            fail("worker %d (pid %d) ended on its own (status 0x%x)", w, pid, status);
        uint64_t pending = SHMF_NO_CLAIM;
        if (shmf_reclaim(base, (uint32_t)w, &pending) != SHMF_OK) fail("reclaim(%d) failed", w);
        shmf_slot *slots = shmf_slots(base);
        for (uint32_t i = 0; i < N_SLOTS; i++)
            if (atomic_load(&slots[i].owner) == w)
                fail("slot %u still owned by dead worker %d after reclaim", i, w);
        restarts++;
        dying[w] = 0;
        rebuilt += pending != SHMF_NO_CLAIM;
        start_worker((uint32_t)w, pending);
    }
}

static void check_batch(uint32_t gen, uint32_t batch, uint32_t state, uint64_t rows, uint32_t slot) {
    uint64_t tag = shmf_tag(gen, batch);
    if (state != SHMF_READY) fail("batch %u of gen %u: state %u", batch, gen, state);
    if (rows != batch % 7 + 1) fail("batch %u of gen %u: %llu rows", batch, gen, (unsigned long long)rows);
    if (atomic_load(&shmf_slots(base)[slot].tag) != tag) fail("batch %u: slot %u has another tag", batch, slot);
    if (atomic_load(&shmf_slots(base)[slot].state) != SHMF_HELD) fail("batch %u: slot %u not HELD", batch, slot);
    uint64_t *words = slot_words(slot);
    for (uint32_t i = 0; i < SLOT_BYTES / 8; i++)
        if (words[i] != pattern(tag, i))
            fail("batch %u of gen %u: word %u of slot %u is torn or from another batch", batch, gen, i, slot);
}

/* Run one phase; returns the number of batches delivered. */
static void run_phase(uint32_t phase, uint32_t epochs, uint32_t *gen_io, unsigned *seed) {
    atomic_store(&shared->phase, phase);
    uint32_t held_slot[N_SLOTS];
    uint64_t held_tag[N_SLOTS];
    uint32_t n_held = 0;
    uint64_t next_slot = 0;
    for (uint32_t e = 0; e < epochs; e++) {
        uint32_t abandon_at = UINT32_MAX;
        if (phase == 2 && rand_r(seed) % 3 == 0) abandon_at = (uint32_t)rand_r(seed) % batches_per_epoch;
        uint32_t gen = shmf_start_epoch(base, e, e * 7919, 0, batches_per_epoch, next_slot);
        if (gen != *gen_io + 1) fail("start_epoch gave generation %u after %u", gen, *gen_io);
        *gen_io = gen;
        for (uint32_t b = 0; b < batches_per_epoch; b++) {
            if (b == abandon_at) {
                shmf_abandon(base, gen);
                abandons++;
                break;
            }
            uint32_t state = 0, slot = 0;
            uint64_t rows = 0;
            double t0 = now_s();
            for (;;) {
                double timeout = phase == 1 ? LONG_WAIT_S : SHORT_WAIT_S;
                shmf_status st = shmf_take(base, gen, b, timeout, &state, &rows, &slot);
                if (st == SHMF_OK) break;
                if (st == SHMF_TIMEOUT && phase == 1)
                    fail("take(batch %u) waited %.1f s: a lost wake-up", b, LONG_WAIT_S);
                if (st != SHMF_TIMEOUT && st != SHMF_INTERRUPTED)
                    fail("take(batch %u of gen %u) returned %d with %u slots held", b, gen, st, n_held);
                supervise();
                if (now_s() - t0 > STALL_S) {
                    shmf_slot *s = shmf_slots(base);
                    for (uint32_t i = 0; i < N_SLOTS; i++)
                        fprintf(stderr, "  slot %u: state %u tag %llx owner %d\n", i, atomic_load(&s[i].state),
                                (unsigned long long)atomic_load(&s[i].tag), atomic_load(&s[i].owner));
                    for (uint32_t i = 0; i < N_WORKERS; i++)
                        fprintf(stderr, "  worker %u: pid %d claim %llx\n", i, pids[i],
                                (unsigned long long)atomic_load(&shmf_workers(base)[i].claim));
                    fail("no progress on batch %u of gen %u for %.0f s: a hang", b, gen, STALL_S);
                }
            }
            check_batch(gen, b, state, rows, slot);
            delivered++;
            next_slot = slot + 1;
            /* Keep a random number of batches (pinned slots), at least 2 slots free. */
            held_slot[n_held] = slot;
            held_tag[n_held] = shmf_tag(gen, b);
            n_held++;
            uint32_t keep = phase == 2 ? (uint32_t)rand_r(seed) % (N_SLOTS - 1) : 0;
            while (n_held > keep) {
                if (shmf_release(base, held_slot[0], held_tag[0]) != SHMF_OK) fail("release failed");
                memmove(held_slot, held_slot + 1, sizeof(held_slot[0]) * (N_SLOTS - 1));
                memmove(held_tag, held_tag + 1, sizeof(held_tag[0]) * (N_SLOTS - 1));
                n_held--;
            }
            if (phase == 2) {
                if (rand_r(seed) % 40 == 0) {
                    uint32_t w = (uint32_t)rand_r(seed) % N_WORKERS;
                    /* A random instant: sometimes right away, sometimes after a spin. */
                    for (volatile uint32_t spin = (uint32_t)rand_r(seed) % 20000; spin > 0; spin--) {
                    }
                    kill(pids[w], SIGKILL);
                    dying[w] = 1;
                    kills++;
                }
                supervise();
            }
        }
        if (abandon_at == UINT32_MAX) {
            for (uint32_t b = 0; b < batches_per_epoch && b < MAX_BATCHES / 8; b++) {
                uint32_t c = atomic_load(&shared->claims[gen][b]);
                /* With kills, a worker can die between its claim and the count. */
                if (c > 1 || (phase == 1 && c != 1)) fail("batch %u of gen %u claimed %u times", b, gen, c);
            }
        }
    }
    while (n_held > 0) {
        n_held--;
        shmf_release(base, held_slot[n_held], held_tag[n_held]);
    }
}

/* A fresh ring of `n_slots` (mapped shared, `*total` bytes) whose epoch of 100 batches
 * has its first n_slots built and READY, by worker `filler` in this process. */
static void *full_ring(const char *what, uint32_t n_slots, uint32_t workers, uint32_t filler,
                       size_t *total, uint32_t *gen) {
    *total = shmf_data_offset(n_slots, workers) + (size_t)n_slots * SLOT_BYTES;
    void *b = mmap(NULL, *total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED || shmf_init(b, *total, n_slots, workers, SLOT_BYTES) != SHMF_OK)
        fail("%s: ring set-up", what);
    *gen = shmf_start_epoch(b, 0, 0, 0, 100, 0);
    uint32_t g, batch, slot;
    uint64_t epoch;
    for (uint32_t i = 0; i < n_slots; i++) {
        if (shmf_claim_wait(b, filler, 0, &g, &epoch, &batch) != SHMF_OK || batch != i ||
            shmf_acquire(b, filler, *gen, i, 1.0, &slot) != SHMF_OK ||
            shmf_publish(b, filler, slot, *gen, i, 1, SHMF_READY, 1) != SHMF_OK)
            fail("%s: filling batch %u", what, i);
    }
    return b;
}

/* Batched wake-ups (ctl.c): a worker asleep for a slot that a release assigned is
 * not woken by that release alone (below the threshold), but must be as soon as the
 * consumer waits for the batch it builds; otherwise the consumer would wait for the
 * worker's own timeout (LONG_WAIT_S here).  Also checks that a release below the
 * threshold leaves the worker asleep (the point of batching). */
static void check_deferred_wake(void) {
    const uint32_t n_slots = 4, workers = 2; /* threshold: 2 slots */
    size_t total;
    uint32_t gen, g, batch, slot, state;
    uint64_t epoch, rows;
    void *b = full_ring("deferred wake", n_slots, workers, 0, &total, &gen);
    if (shmf_claim(b, 1, &g, &epoch, &batch) != SHMF_OK || batch != n_slots)
        fail("deferred wake: claim of batch %u", n_slots);
    pid_t pid = fork();
    if (pid == 0) { /* the worker: asleep until batch 4 has a slot */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        double t = now_s();
        if (shmf_acquire(b, 1, gen, n_slots, LONG_WAIT_S, &slot) != SHMF_OK) _exit(3);
        /* Woken by the release alone would be within ~0.1 s (the parent waits 0.3 s). */
        if (now_s() - t < 0.25) _exit(4);
        shmf_publish(b, 1, slot, gen, n_slots, 1, SHMF_READY, 1);
        _exit(0);
    }
    shmf_header *h = shmf_hdr(b);
    double deadline = now_s() + LONG_WAIT_S;
    while (atomic_load(&h->assign_waiters) == 0)
        if (now_s() > deadline) fail("deferred wake: the worker never waited");
    usleep(20000); /* into the futex */
    if (shmf_take(b, gen, 0, 1.0, &state, &rows, &slot) != SHMF_OK) fail("deferred wake: take 0");
    if (shmf_release(b, slot, shmf_tag(gen, 0)) != SHMF_OK) fail("deferred wake: release 0");
    usleep(300000);
    /* Batches 1..3 are taken and kept (no release, so no further wake-up), then
     * batch 4, the worker's: only the consumer's own wait can wake the worker. */
    uint32_t kept[4];
    for (uint32_t i = 1; i <= n_slots; i++) {
        double t = now_s();
        if (shmf_take(b, gen, i, LONG_WAIT_S, &state, &rows, &kept[i - 1]) != SHMF_OK || state != SHMF_READY)
            fail("deferred wake: take %u", i);
        if (now_s() - t > LONG_WAIT_S / 2)
            fail("deferred wake: batch %u took %.1f s: the consumer's wait did not wake its builder", i,
                 now_s() - t);
    }
    for (uint32_t i = 1; i <= n_slots; i++) shmf_release(b, kept[i - 1], shmf_tag(gen, i));
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("deferred wake: worker ended with status 0x%x (4: woken by one release)", status);
    munmap(b, total);
}

/* A worker of check_wake_one: claim, build and publish until shutdown. */
static void wake_one_worker(void *b, uint32_t w) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        uint32_t gen, batch, slot;
        uint64_t epoch;
        shmf_status st = shmf_claim_wait(b, w, LONG_WAIT_S, &gen, &epoch, &batch);
        if (st == SHMF_SHUTDOWN) _exit(0);
        if (st == SHMF_TIMEOUT || st == SHMF_INTERRUPTED) continue;
        if (st != SHMF_OK || shmf_acquire(b, w, gen, batch, 1.0, &slot) != SHMF_OK ||
            shmf_publish(b, w, slot, gen, batch, 1, SHMF_READY, 1) != SHMF_OK)
            _exit(3);
    }
}

/* Wake-one (ctl.c): two workers asleep in shmf_claim_wait with the ring full.  A
 * release below the threshold wakes neither; the one that reaches it wakes exactly
 * one, which builds both batches; the consumer's own wait for a batch nobody builds
 * wakes them all (here, with one worker stopped after the wake-up). */
static void check_wake_one(void) {
    const uint32_t n_slots = 4, workers = 3; /* threshold: 2 slots; worker 2 is the parent */
    size_t total;
    uint32_t gen, g, batch, slot, state;
    uint64_t epoch, rows;
    void *b = full_ring("wake one", n_slots, workers, 2, &total, &gen);
    shmf_header *h = shmf_hdr(b);
    shmf_worker *ws = shmf_workers(b);
    if (shmf_claim_wait(b, 2, 0.01, &g, &epoch, &batch) != SHMF_TIMEOUT)
        fail("wake one: claimed batch %u although it has no slot", batch);
    pid_t pid[2];
    for (uint32_t w = 0; w < 2; w++) {
        pid[w] = fork();
        if (pid[w] == 0) wake_one_worker(b, w);
    }
    double deadline = now_s() + LONG_WAIT_S;
    while (atomic_load(&h->claim_waiters) < 2)
        if (now_s() > deadline) fail("wake one: the workers never waited");
    usleep(20000); /* into the futex */
    uint32_t next = 0;
    /* Take and release batch `next`. */
#define TAKE_RELEASE()                                                                      \
    do {                                                                                    \
        if (shmf_take(b, gen, next, LONG_WAIT_S, &state, &rows, &slot) != SHMF_OK ||        \
            shmf_release(b, slot, shmf_tag(gen, next)) != SHMF_OK)                          \
            fail("wake one: batch %u", next);                                               \
        next++;                                                                             \
    } while (0)
    TAKE_RELEASE(); /* 1 slot waits: below the threshold */
    usleep(100000);
    if (atomic_load(&ws[0].batches) + atomic_load(&ws[1].batches) != 0)
        fail("wake one: a release below the threshold woke a worker");
    TAKE_RELEASE(); /* 2 slots wait: one worker is woken and builds both */
    deadline = now_s() + LONG_WAIT_S;
    while (atomic_load(&ws[0].batches) + atomic_load(&ws[1].batches) < 2)
        if (now_s() > deadline) fail("wake one: nobody built batches 4 and 5");
    usleep(100000);
    uint64_t built0 = atomic_load(&ws[0].batches), built1 = atomic_load(&ws[1].batches);
    if (!((built0 == 2 && built1 == 0) || (built0 == 0 && built1 == 2)))
        fail("wake one: the workers built %llu and %llu batches, not 2 and 0",
             (unsigned long long)built0, (unsigned long long)built1);
    /* Stop the worker that just ran: the next wake-up may reach it alone, and the
     * consumer's wait must still get its batches built by the other. */
    uint32_t active = built0 == 2 ? 0 : 1;
    kill(pid[active], SIGSTOP);
    while (next < 10) {
        double t = now_s();
        TAKE_RELEASE();
        if (now_s() - t > LONG_WAIT_S / 2)
            fail("wake one: batch %u took %.1f s: the consumer's wait did not wake a builder", next - 1,
                 now_s() - t);
    }
#undef TAKE_RELEASE
    if (atomic_load(&ws[1 - active].batches) == 0) fail("wake one: the other worker never built");
    shmf_shutdown(b);
    kill(pid[active], SIGCONT);
    for (uint32_t w = 0; w < 2; w++) {
        int status;
        if (waitpid(pid[w], &status, 0) != pid[w] || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("wake one: worker %u ended with status 0x%x", w, status);
    }
    munmap(b, total);
}

int main(int argc, char **argv) {
    uint32_t epochs = argc > 1 ? (uint32_t)atoi(argv[1]) : 10;
    batches_per_epoch = argc > 2 ? (uint32_t)atoi(argv[2]) : 3000;
    if (2 * epochs + 1 >= MAX_GENS || batches_per_epoch >= MAX_BATCHES / 8 || batches_per_epoch == 0)
        fail("bad arguments");
    parent = getpid();
    check_deferred_wake();
    check_wake_one();
    size_t total = shmf_data_offset(N_SLOTS, N_WORKERS) + (size_t)N_SLOTS * SLOT_BYTES;
    base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    shared = mmap(NULL, sizeof(shared_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || shared == MAP_FAILED) fail("mmap: %s", strerror(errno));
    if (shmf_init(base, total, N_SLOTS, N_WORKERS, SLOT_BYTES) != SHMF_OK) fail("shmf_init");
    if (shmf_check(base, total) != SHMF_OK) fail("shmf_check");
    for (uint32_t w = 0; w < N_WORKERS; w++) start_worker(w, SHMF_NO_CLAIM);

    double t0 = now_s();
    uint32_t gen = 0;
    unsigned seed = 12345;
    run_phase(1, epochs, &gen, &seed);
    uint64_t delivered1 = delivered;
    if (atomic_load(&shared->timeouts) != 0)
        fail("%llu worker waits ran out in phase 1: lost wake-ups",
             (unsigned long long)atomic_load(&shared->timeouts));
    double t1 = now_s();
    run_phase(2, epochs, &gen, &seed);
    double t2 = now_s();

    /* A worker killed during the last batches may not have died yet: reap it (and
     * start its replacement) before checking that the others leave on their own. */
    double deadline = now_s() + STALL_S;
    for (int i = 0; i < N_WORKERS; i++)
        while (dying[i]) {
            if (now_s() > deadline) fail("worker %d did not die of SIGKILL", i);
            supervise();
            usleep(1000);
        }
    shmf_shutdown(base);
    for (int i = 0; i < N_WORKERS; i++) {
        double deadline = now_s() + 5;
        int status;
        while (waitpid(pids[i], &status, WNOHANG) == 0) {
            if (now_s() > deadline) fail("worker %d did not leave at shutdown", i);
            usleep(1000);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("worker %d ended with status 0x%x", i, status);
        pids[i] = 0;
        uint64_t pending;
        shmf_reclaim(base, (uint32_t)i, &pending);
    }
    shmf_slot *s = shmf_slots(base);
    for (uint32_t i = 0; i < N_SLOTS; i++) {
        if (atomic_load(&s[i].state) == SHMF_FILLING || atomic_load(&s[i].owner) != -1)
            fail("slot %u left FILLING or owned after shutdown", i);
        if (atomic_load(&s[i].state) == SHMF_HELD) fail("slot %u left HELD", i);
    }
    /* Each delivered batch is about 5 control-plane operations: claim, acquire,
     * publish, take, release. */
    printf("test_ctl: ok: phase 1 %llu batches in %.2f s without a lost wake-up; phase 2 %llu batches in "
           "%.2f s with %llu kills (%llu restarts, %llu claims rebuilt), %llu epochs abandoned; "
           "%llu claims in all\n",
           (unsigned long long)delivered1, t1 - t0, (unsigned long long)(delivered - delivered1), t2 - t1,
           (unsigned long long)kills, (unsigned long long)restarts, (unsigned long long)rebuilt,
           (unsigned long long)abandons, (unsigned long long)atomic_load(&shared->claimed));
    return 0;
}
