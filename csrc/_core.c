/*
 * Thin CPython binding over ctl.c.  It owns no policy and writes nothing to the
 * control block itself: every write is one shmf_* call (so csrc/test_ctl.c covers
 * them all); the rest are read-only snapshots (header, worker, slot, gen_info) and
 * two objects whose deallocation makes one such call (SlotRef, EpochGuard; `take`
 * hands the slot it took to a new SlotRef, so that no path loses it).  Waits
 * release the GIL.  Status codes go back to shmfeed/_engine/control.py, the one place that
 * interprets them.  The only exceptions raised here are for misuse (bad buffer,
 * index out of range) and for signals that arrive during a wait (PyErr_CheckSignals,
 * so Ctrl-C reaches the training loop promptly).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "gather.h"
#include "kernels_api.h"
#include "shmfeed_ctl.h"

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* held for the object's lifetime: keeps the mapping alive */
    void *base;
} ControlObject;

static void Control_dealloc(ControlObject *self) {
    if (self->base) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* This process's pid without a system call per batch (glibc's getpid() is one):
 * set when the module loads and again in every child fork() makes. */
static pid_t this_pid;
static void refresh_pid(void) { this_pid = getpid(); }

static int Control_init(ControlObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &obj)) return -1;
    if (self->base) {
        PyErr_SetString(PyExc_RuntimeError, "Control already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (((uintptr_t)self->view.buf) % 64 != 0 || (size_t)self->view.len < sizeof(shmf_header)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "control buffer must be 64-byte aligned and large enough");
        return -1;
    }
    self->base = self->view.buf;
    return 0;
}

/* Whether a wait that ended with `st` must raise instead: a signal's handler raised
 * (Ctrl-C's KeyboardInterrupt), and its exception is now pending.  After an
 * interrupted wait, and after a timed-out one too: a signal that the kernel gave to
 * another thread (one that does not block it, e.g. OpenBLAS's) sets CPython's flag
 * without interrupting this thread's wait.  Every wait runs it, so that the wait
 * itself raises, even where no bytecode runs before the next wait (a caller in C);
 * checking costs one atomic load. */
static int wait_interrupted(shmf_status st) {
    return (st == SHMF_INTERRUPTED || st == SHMF_TIMEOUT) && PyErr_CheckSignals() < 0;
}

/* Turn the status of a wait into its Python result, or the pending exception. */
static PyObject *status_result(shmf_status st) {
    if (wait_interrupted(st)) return NULL;
    return PyLong_FromLong(st);
}

static PyObject *Control_init_block(ControlObject *self, PyObject *args) {
    unsigned int n_slots, max_workers;
    unsigned long long slot_bytes;
    if (!PyArg_ParseTuple(args, "IIK", &n_slots, &max_workers, &slot_bytes)) return NULL;
    return PyLong_FromLong(
        shmf_init(self->base, (size_t)self->view.len, n_slots, max_workers, slot_bytes));
}

static PyObject *Control_check(ControlObject *self, PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(shmf_check(self->base, (size_t)self->view.len));
}

static PyObject *Control_start_epoch(ControlObject *self, PyObject *args) {
    unsigned long long epoch, key, first_batch, n_batches, slot_base;
    if (!PyArg_ParseTuple(args, "KKKKK", &epoch, &key, &first_batch, &n_batches, &slot_base))
        return NULL;
    return PyLong_FromUnsignedLong(
        shmf_start_epoch(self->base, epoch, key, first_batch, n_batches, slot_base));
}

static PyObject *Control_claim(ControlObject *self, PyObject *args) {
    unsigned int worker;
    if (!PyArg_ParseTuple(args, "I", &worker)) return NULL;
    uint32_t gen = 0, batch = 0;
    uint64_t epoch = 0;
    shmf_status st = shmf_claim(self->base, worker, &gen, &epoch, &batch);
    return Py_BuildValue("iIKI", (int)st, gen, (unsigned long long)epoch, batch);
}

static PyObject *Control_claim_wait(ControlObject *self, PyObject *args) {
    unsigned int worker;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "Id", &worker, &timeout_s)) return NULL;
    uint32_t gen = 0, batch = 0;
    uint64_t epoch = 0;
    shmf_status st;
    Py_BEGIN_ALLOW_THREADS
    st = shmf_claim_wait(self->base, worker, timeout_s, &gen, &epoch, &batch);
    Py_END_ALLOW_THREADS
    if (wait_interrupted(st)) return NULL;
    return Py_BuildValue("iIKI", (int)st, gen, (unsigned long long)epoch, batch);
}

static PyObject *Control_wait_gen(ControlObject *self, PyObject *args) {
    unsigned int gen;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "Id", &gen, &timeout_s)) return NULL;
    shmf_status st;
    Py_BEGIN_ALLOW_THREADS
    st = shmf_wait_gen(self->base, gen, timeout_s);
    Py_END_ALLOW_THREADS
    return status_result(st);
}

static PyObject *Control_acquire(ControlObject *self, PyObject *args) {
    unsigned int worker, gen, batch;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "IIId", &worker, &gen, &batch, &timeout_s)) return NULL;
    shmf_status st;
    uint32_t slot = SHMF_NO_SLOT;
    Py_BEGIN_ALLOW_THREADS
    st = shmf_acquire(self->base, worker, gen, batch, timeout_s, &slot);
    Py_END_ALLOW_THREADS
    PyObject *status = status_result(st);
    if (!status) return NULL;
    return Py_BuildValue("NI", status, slot);
}

static PyObject *Control_publish(ControlObject *self, PyObject *args) {
    unsigned int worker, slot, gen, batch, state;
    unsigned long long rows, busy_ns;
    if (!PyArg_ParseTuple(args, "IIIIKIK", &worker, &slot, &gen, &batch, &rows, &state, &busy_ns))
        return NULL;
    return PyLong_FromLong(
        shmf_publish(self->base, worker, slot, gen, batch, rows, state, busy_ns));
}

static PyObject *new_slot_ref(ControlObject *self, uint32_t slot, uint64_t tag);

/* ---- GatherPlan: gather.h's shmf_gather_plan, made once per worker ------------------ */

typedef struct {
    PyObject_HEAD
    shmf_gather_plan plan;
    Py_buffer *views; /* the leaves' sources, held for the plan's lifetime */
    Py_ssize_t n_views;
    shmf_gather_leaf *leaves;
    uint64_t slot_extent; /* bytes of a slot the fullest batch writes */
} GatherPlanObject;

static void GatherPlan_dealloc(GatherPlanObject *self) {
    for (Py_ssize_t i = 0; i < self->n_views; i++) PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    PyMem_Free(self->leaves);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* GatherPlan(order, leaves): order an EpochOrder (its capsule), leaves a list of
 * (source buffer, stride, row_bytes, offset in a slot).  Every row of the order must
 * be readable from every leaf: then no copy can fail (gather.h). */
static int GatherPlan_init(GatherPlanObject *self, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *order_obj, *leaves_obj;
    if (!PyArg_ParseTuple(args, "OO!", &order_obj, &PyList_Type, &leaves_obj)) return -1;
    if (self->views) {
        PyErr_SetString(PyExc_RuntimeError, "GatherPlan already initialised");
        return -1;
    }
    PyObject *cap = PyObject_GetAttrString(order_obj, "capsule");
    if (!cap) return -1;
    const shmf_order *order = PyCapsule_GetPointer(cap, SHMF_ORDER_CAPSULE);
    if (order) self->plan.order = *order; /* copied while order_obj holds it */
    Py_DECREF(cap);
    if (!order) return -1;
    Py_ssize_t n = PyList_GET_SIZE(leaves_obj);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "GatherPlan: no leaves");
        return -1;
    }
    self->views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    self->leaves = PyMem_Calloc((size_t)n, sizeof(shmf_gather_leaf));
    if (!self->views || !self->leaves) {
        PyErr_NoMemory();
        return -1;
    }
    const uint64_t n_items = self->plan.order.n_items, rows = self->plan.order.batch_size;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *src;
        Py_ssize_t stride, row_bytes, offset;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(leaves_obj, i), "Onnn", &src, &stride, &row_bytes,
                              &offset) ||
            PyObject_GetBuffer(src, &self->views[i], PyBUF_SIMPLE) < 0)
            return -1;
        self->n_views = i + 1;
        shmf_gather_leaf *lf = &self->leaves[i];
        const Py_buffer *v = &self->views[i];
        int sized = stride >= 1 && row_bytes >= 1;
        lf->n_rows = sized ? shmf_rows_in((uint64_t)v->len, (uint64_t)stride, (uint64_t)row_bytes) : 0;
        /* A batch of more bytes than 2^62 fits no slot: refused here, not wrapped. */
        if (!sized || lf->n_rows < n_items || offset < 0 ||
            rows > (UINT64_C(1) << 62) / (uint64_t)row_bytes) {
            PyErr_Format(PyExc_ValueError, "GatherPlan: leaf %zd (%llu rows of %zd bytes at offset "
                         "%zd) does not fit %llu items", i, (unsigned long long)lf->n_rows, row_bytes,
                         offset, (unsigned long long)n_items);
            return -1;
        }
        lf->src = v->buf;
        lf->stride = (size_t)stride;
        lf->row_bytes = (size_t)row_bytes;
        lf->offset = (size_t)offset;
        uint64_t end = (uint64_t)offset + rows * (uint64_t)row_bytes;
        if (end > self->slot_extent) self->slot_extent = end;
    }
    self->plan.n_leaves = (uint32_t)n;
    self->plan.leaves = self->leaves;
    return 0;
}

static PyObject *GatherPlan_slot_extent(GatherPlanObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(self->slot_extent);
}

static PyGetSetDef GatherPlan_getset[] = {
    {"slot_extent", (getter)GatherPlan_slot_extent, NULL, "bytes of a slot its fullest batch writes", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GatherPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfeed._core.GatherPlan",
    .tp_basicsize = sizeof(GatherPlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GatherPlan(order, leaves): what a worker's C loop builds array batches with "
              "(csrc/gather.h); order an _kernels.EpochOrder, leaves [(buffer, stride, row_bytes, offset)]",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)GatherPlan_init,
    .tp_dealloc = (destructor)GatherPlan_dealloc,
    .tp_getset = GatherPlan_getset,
};

/* gather_batches(worker, timeout_s, plan): see gather.h. */
static PyObject *Control_gather_batches(ControlObject *self, PyObject *args) {
    unsigned int worker;
    double timeout_s;
    GatherPlanObject *plan;
    if (!PyArg_ParseTuple(args, "IdO!", &worker, &timeout_s, &GatherPlanType, &plan)) return NULL;
    shmf_header *h = shmf_hdr(self->base);
    /* Every batch must fit its slot: then no copy can fail (gather.h). */
    if (plan->slot_extent > h->slot_bytes)
        return PyErr_Format(PyExc_ValueError, "gather_batches: the plan writes %llu bytes of a slot, "
                            "and slots have %llu", (unsigned long long)plan->slot_extent,
                            (unsigned long long)h->slot_bytes);
    /* batch_size rows fit a slot (checked above), so this is at most 8 bytes a slot byte. */
    int64_t *scratch = PyMem_Malloc(plan->plan.order.batch_size * sizeof(int64_t));
    if (!scratch) return PyErr_NoMemory();
    uint32_t gen = 0, batch = 0;
    uint64_t claimed_epoch = 0;
    shmf_status st;
    /* `args` holds the plan (and its buffers) until this call returns. */
    Py_BEGIN_ALLOW_THREADS
    st = shmf_gather_batches(self->base, worker, &plan->plan, scratch, timeout_s, &gen,
                             &claimed_epoch, &batch);
    Py_END_ALLOW_THREADS
    PyMem_Free(scratch);
    if (wait_interrupted(st)) return NULL;
    return Py_BuildValue("iIKI", (int)st, gen, (unsigned long long)claimed_epoch, batch);
}

static PyObject *Control_take(ControlObject *self, PyObject *args) {
    unsigned int gen, batch;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "IId", &gen, &batch, &timeout_s)) return NULL;
    shmf_status st;
    uint32_t state = 0, slot = 0;
    uint64_t rows = 0;
    Py_BEGIN_ALLOW_THREADS
    st = shmf_take(self->base, gen, batch, timeout_s, &state, &rows, &slot);
    Py_END_ALLOW_THREADS
    /* The slot is HELD from here on: its SlotRef releases it however this call and the
     * caller end (with the tuple, on an error; with the batch's arrays, otherwise). */
    PyObject *ref = Py_None;
    if (st == SHMF_OK) {
        uint64_t tag = shmf_tag(gen, batch);
        ref = new_slot_ref(self, slot, tag);
        if (!ref) {
            shmf_release(self->base, slot, tag);
            return NULL;
        }
    } else {
        Py_INCREF(ref);
    }
    PyObject *result = Py_BuildValue("iIKIN", (int)st, state, (unsigned long long)rows, slot, ref);
    if (!result) return NULL;
    /* Every time, not only after EINTR: see status_result.  This is the call a training
     * loop makes once per step, so a Ctrl-C surfaces within a step at worst. */
    if (PyErr_CheckSignals() < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *Control_release(ControlObject *self, PyObject *args) {
    unsigned int slot;
    unsigned long long tag;
    if (!PyArg_ParseTuple(args, "IK", &slot, &tag)) return NULL;
    return PyLong_FromLong(shmf_release(self->base, slot, tag));
}

static PyObject *Control_reclaim(ControlObject *self, PyObject *args) {
    unsigned int worker;
    if (!PyArg_ParseTuple(args, "I", &worker)) return NULL;
    uint64_t pending = SHMF_NO_CLAIM;
    shmf_status st = shmf_reclaim(self->base, worker, &pending);
    return Py_BuildValue("iK", (int)st, (unsigned long long)pending);
}

static PyObject *Control_set_claim(ControlObject *self, PyObject *args) {
    unsigned int worker;
    unsigned long long tag;
    if (!PyArg_ParseTuple(args, "IK", &worker, &tag)) return NULL;
    return PyLong_FromLong(shmf_set_claim(self->base, worker, tag));
}

static PyObject *Control_shutdown(ControlObject *self, PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(shmf_shutdown(self->base));
}

static PyObject *Control_slot_of(ControlObject *self, PyObject *args) {
    unsigned int gen, batch;
    if (!PyArg_ParseTuple(args, "II", &gen, &batch)) return NULL;
    uint32_t slot = shmf_slot_of(self->base, gen, batch);
    if (slot == SHMF_NO_SLOT) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLong(slot);
}

static PyObject *Control_abandon(ControlObject *self, PyObject *args) {
    unsigned int gen;
    if (!PyArg_ParseTuple(args, "I", &gen)) return NULL;
    shmf_abandon(self->base, gen);
    Py_RETURN_NONE;
}

static PyObject *Control_assign_free(ControlObject *self, PyObject *Py_UNUSED(a)) {
    shmf_assign_free(self->base);
    Py_RETURN_NONE;
}

static PyObject *Control_reopen(ControlObject *self, PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(shmf_reopen(self->base));
}

static PyObject *Control_gen_info(ControlObject *self, PyObject *args) {
    unsigned int gen;
    if (!PyArg_ParseTuple(args, "I", &gen)) return NULL;
    const shmf_gen_info *g = &shmf_hdr(self->base)->gens[gen % SHMF_GEN_TABLE];
    return Py_BuildValue("KKKK", (unsigned long long)g->epoch, (unsigned long long)g->first_batch,
                         (unsigned long long)g->n_batches, (unsigned long long)g->key);
}

static PyObject *Control_set_fatal(ControlObject *self, PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(shmf_set_fatal(self->base));
}

/* Read-only snapshot of the counters, for stats() and for the supervisor. */
static PyObject *Control_header(ControlObject *self, PyObject *Py_UNUSED(a)) {
    shmf_header *h = shmf_hdr(self->base);
    uint64_t c = atomic_load(&h->claim);
    return Py_BuildValue("{sIsIsKsKsIsKsIsIsKsKsI}", "n_slots", h->n_slots, "max_workers",
                         h->max_workers, "slot_bytes", (unsigned long long)h->slot_bytes,
                         "data_offset", (unsigned long long)h->data_offset, "gen",
                         (unsigned int)(c >> 32), "next_claim", (unsigned long long)(uint32_t)c,
                         "shutdown", (unsigned int)atomic_load(&h->shutdown), "fatal",
                         (unsigned int)atomic_load(&h->fatal), "restarts",
                         (unsigned long long)atomic_load(&h->restarts), "consumer_tag",
                         (unsigned long long)atomic_load(&h->consumer_tag), "progress",
                         (unsigned int)atomic_load(&h->progress));
}

static PyObject *Control_add_restart(ControlObject *self, PyObject *Py_UNUSED(a)) {
    uint64_t restarts = 0;
    shmf_status st = shmf_add_restart(self->base, &restarts);
    return Py_BuildValue("iK", (int)st, (unsigned long long)restarts);
}

static PyObject *Control_worker(ControlObject *self, PyObject *args) {
    unsigned int worker;
    if (!PyArg_ParseTuple(args, "I", &worker)) return NULL;
    shmf_header *h = shmf_hdr(self->base);
    if (worker >= h->max_workers) return PyErr_Format(PyExc_IndexError, "worker %u", worker);
    shmf_worker *w = &shmf_workers(self->base)[worker];
    return Py_BuildValue("{sisKsKsK}", "pid", (int)atomic_load(&w->pid), "batches",
                         (unsigned long long)atomic_load(&w->batches), "busy_ns",
                         (unsigned long long)atomic_load(&w->busy_ns), "claim",
                         (unsigned long long)atomic_load(&w->claim));
}

static PyObject *Control_set_worker_pid(ControlObject *self, PyObject *args) {
    unsigned int worker;
    int pid;
    if (!PyArg_ParseTuple(args, "Ii", &worker, &pid)) return NULL;
    return PyLong_FromLong(shmf_set_worker_pid(self->base, worker, pid));
}

static PyObject *Control_slot(ControlObject *self, PyObject *args) {
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "I", &slot)) return NULL;
    shmf_header *h = shmf_hdr(self->base);
    if (slot >= h->n_slots) return PyErr_Format(PyExc_IndexError, "slot %u", slot);
    shmf_slot *s = &shmf_slots(self->base)[slot];
    return Py_BuildValue("{sIsKsisK}", "state", (unsigned int)atomic_load(&s->state), "tag",
                         (unsigned long long)atomic_load(&s->tag), "owner",
                         (int)atomic_load(&s->owner), "rows",
                         (unsigned long long)atomic_load(&s->rows));
}

/* One delivered batch's hold on its slot.  The batch's numpy arrays reach it through
 * their base chain; when the last of them dies, tp_dealloc releases the slot.  In C
 * on purpose: a Python __del__ runs bytecode, where a Ctrl-C can be raised and is then
 * dropped by the interpreter ("Exception ignored in ..."), losing the Ctrl-C and the
 * slot with it. */
typedef struct {
    PyObject_HEAD
    PyObject *control; /* the ControlObject: keeps the mapping alive */
    char *buf;
    Py_ssize_t len;
    uint32_t slot;
    uint64_t tag;
    pid_t pid; /* a forked copy must not release the parent's slot */
} SlotRefObject;

static void SlotRef_dealloc(SlotRefObject *self) {
    ControlObject *ctl = (ControlObject *)self->control;
    if (ctl && ctl->base && this_pid == self->pid) shmf_release(ctl->base, self->slot, self->tag);
    Py_XDECREF(self->control);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int SlotRef_getbuffer(SlotRefObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->buf, self->len, 0, flags);
}

static PyBufferProcs SlotRef_as_buffer = {(getbufferproc)SlotRef_getbuffer, NULL};

static PyObject *SlotRef_repr(SlotRefObject *self) {
    return PyUnicode_FromFormat("<shmfeed slot %u, tag %llu>", (unsigned int)self->slot,
                                (unsigned long long)self->tag);
}

static PyTypeObject SlotRefType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfeed._core.SlotRef",
    .tp_basicsize = sizeof(SlotRefObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A held ring slot, as a writable buffer; released when it is freed.",
    .tp_dealloc = (destructor)SlotRef_dealloc,
    .tp_as_buffer = &SlotRef_as_buffer,
    .tp_repr = (reprfunc)SlotRef_repr,
};

/* A SlotRef over slot `slot`'s data, for the batch `tag` this process holds there. */
static PyObject *new_slot_ref(ControlObject *self, uint32_t slot, uint64_t tag) {
    shmf_header *h = shmf_hdr(self->base);
    uint64_t offset = h->data_offset + (uint64_t)slot * h->slot_bytes;
    if (slot >= h->n_slots || offset + h->slot_bytes > (uint64_t)self->view.len)
        return PyErr_Format(PyExc_ValueError, "slot %u lies outside the ring", slot);
    SlotRefObject *ref = PyObject_New(SlotRefObject, &SlotRefType);
    if (!ref) return NULL;
    Py_INCREF(self);
    ref->control = (PyObject *)self;
    ref->buf = (char *)self->base + offset;
    ref->len = (Py_ssize_t)h->slot_bytes;
    ref->slot = slot;
    ref->tag = tag;
    ref->pid = this_pid;
    return (PyObject *)ref;
}

/* The training loop's hold on one epoch: freed while still armed (the loop was left
 * early, the iterator dropped), it gives the epoch up with shmf_abandon.  In C for the
 * same reason as SlotRef: the finalizer of a Python generator that runs code can have a
 * Ctrl-C raised in it and dropped. */
typedef struct {
    PyObject_HEAD
    PyObject *control;
    uint32_t gen;
    int armed;
    pid_t pid;
} EpochGuardObject;

static void EpochGuard_dealloc(EpochGuardObject *self) {
    ControlObject *ctl = (ControlObject *)self->control;
    if (self->armed && ctl && ctl->base && this_pid == self->pid) shmf_abandon(ctl->base, self->gen);
    Py_XDECREF(self->control);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *EpochGuard_abandon(EpochGuardObject *self, PyObject *Py_UNUSED(a)) {
    ControlObject *ctl = (ControlObject *)self->control;
    if (self->armed && ctl->base) shmf_abandon(ctl->base, self->gen);
    self->armed = 0;
    Py_RETURN_NONE;
}

static PyObject *EpochGuard_disarm(EpochGuardObject *self, PyObject *Py_UNUSED(a)) {
    self->armed = 0;
    Py_RETURN_NONE;
}

static PyMethodDef EpochGuard_methods[] = {
    {"abandon", (PyCFunction)EpochGuard_abandon, METH_NOARGS, "abandon(): give the epoch up now"},
    {"disarm", (PyCFunction)EpochGuard_disarm, METH_NOARGS, "disarm(): the epoch completed"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EpochGuardType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfeed._core.EpochGuard",
    .tp_basicsize = sizeof(EpochGuardObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Gives an epoch up (shmf_abandon) when freed before disarm().",
    .tp_dealloc = (destructor)EpochGuard_dealloc,
    .tp_methods = EpochGuard_methods,
};

static PyObject *Control_epoch_guard(ControlObject *self, PyObject *args) {
    unsigned int gen;
    if (!PyArg_ParseTuple(args, "I", &gen)) return NULL;
    EpochGuardObject *g = PyObject_New(EpochGuardObject, &EpochGuardType);
    if (!g) return NULL;
    Py_INCREF(self);
    g->control = (PyObject *)self;
    g->gen = gen;
    g->armed = 1;
    g->pid = this_pid;
    return (PyObject *)g;
}

static PyMethodDef Control_methods[] = {
    {"epoch_guard", (PyCFunction)Control_epoch_guard, METH_VARARGS, "epoch_guard(gen) -> EpochGuard: abandons the epoch when freed before disarm()"},
    {"init_block", (PyCFunction)Control_init_block, METH_VARARGS, "init_block(n_slots, max_workers, slot_bytes) -> status"},
    {"check", (PyCFunction)Control_check, METH_NOARGS, "check() -> status"},
    {"start_epoch", (PyCFunction)Control_start_epoch, METH_VARARGS, "start_epoch(epoch, key, first_batch, n_batches, slot_base) -> gen"},
    {"claim", (PyCFunction)Control_claim, METH_VARARGS, "claim(worker) -> (status, gen, epoch, batch)"},
    {"claim_wait", (PyCFunction)Control_claim_wait, METH_VARARGS,
     "claim_wait(worker, timeout_s) -> (status, gen, epoch, batch)"},
    {"wait_gen", (PyCFunction)Control_wait_gen, METH_VARARGS, "wait_gen(gen, timeout_s) -> status"},
    {"acquire", (PyCFunction)Control_acquire, METH_VARARGS, "acquire(worker, gen, batch, timeout_s) -> (status, slot)"},
    {"publish", (PyCFunction)Control_publish, METH_VARARGS, "publish(worker, slot, gen, batch, rows, state, busy_ns) -> status"},
    {"gather_batches", (PyCFunction)Control_gather_batches, METH_VARARGS,
     "gather_batches(worker, timeout_s, plan) -> (status, gen, epoch, batch): "
     "build array batches in C until a claim needs Python (csrc/gather.h)"},
    {"take", (PyCFunction)Control_take, METH_VARARGS, "take(gen, batch, timeout_s) -> (status, state, rows, slot, SlotRef or None): the SlotRef releases the taken slot when freed"},
    {"release", (PyCFunction)Control_release, METH_VARARGS, "release(slot, tag) -> status"},
    {"reclaim", (PyCFunction)Control_reclaim, METH_VARARGS, "reclaim(worker) -> (status, pending_tag)"},
    {"set_claim", (PyCFunction)Control_set_claim, METH_VARARGS, "set_claim(worker, tag) -> status"},
    {"shutdown", (PyCFunction)Control_shutdown, METH_NOARGS, "shutdown() -> status"},
    {"slot_of", (PyCFunction)Control_slot_of, METH_VARARGS, "slot_of(gen, batch) -> slot assigned to that batch, or -1"},
    {"abandon", (PyCFunction)Control_abandon, METH_VARARGS, "abandon(gen): the consumer takes no more batches of this generation"},
    {"assign_free", (PyCFunction)Control_assign_free, METH_NOARGS, "assign_free(): give free slots to the next batches"},
    {"reopen", (PyCFunction)Control_reopen, METH_NOARGS, "reopen() -> status"},
    {"gen_info", (PyCFunction)Control_gen_info, METH_VARARGS, "gen_info(gen) -> (epoch, first_batch, n_batches, key)"},
    {"set_fatal", (PyCFunction)Control_set_fatal, METH_NOARGS, "set_fatal() -> status"},
    {"header", (PyCFunction)Control_header, METH_NOARGS, "header() -> dict"},
    {"add_restart", (PyCFunction)Control_add_restart, METH_NOARGS, "add_restart() -> (status, restarts so far)"},
    {"worker", (PyCFunction)Control_worker, METH_VARARGS, "worker(i) -> dict"},
    {"set_worker_pid", (PyCFunction)Control_set_worker_pid, METH_VARARGS, "set_worker_pid(i, pid) -> status"},
    {"slot", (PyCFunction)Control_slot, METH_VARARGS, "slot(i) -> dict"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ControlType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfeed._core.Control",
    .tp_basicsize = sizeof(ControlObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Control(buffer): the control block at the start of a writable buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Control_init,
    .tp_dealloc = (destructor)Control_dealloc,
    .tp_methods = Control_methods,
};

static PyObject *core_layout(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned int n_slots, max_workers;
    if (!PyArg_ParseTuple(args, "II", &n_slots, &max_workers)) return NULL;
    PyObject *reports = PyList_New(n_slots);
    if (!reports) return NULL;
    for (unsigned int i = 0; i < n_slots; i++)
        PyList_SET_ITEM(reports, i, PyLong_FromSize_t(shmf_report_offset(n_slots, max_workers, i)));
    return Py_BuildValue("{sNsnsn}", "reports", reports, "fatal",
                         (Py_ssize_t)shmf_fatal_offset(n_slots, max_workers), "data",
                         (Py_ssize_t)shmf_data_offset(n_slots, max_workers));
}

/* data_offset(n_slots, max_workers): where slot data starts, computed without building
 * the per-slot list layout() returns, so that any ring size is checked before anything
 * of its size is made.  Counts beyond 32 bits are refused, not truncated. */
static PyObject *core_data_offset(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long n_slots, max_workers;
    if (!PyArg_ParseTuple(args, "KK", &n_slots, &max_workers)) return NULL;
    if (n_slots > UINT32_MAX || max_workers > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "n_slots and max_workers must fit 32 bits");
        return NULL;
    }
    return PyLong_FromSize_t(shmf_data_offset((uint32_t)n_slots, (uint32_t)max_workers));
}

static PyObject *core_address(PyObject *Py_UNUSED(m), PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return r;
}

static PyObject *core_set_pdeathsig(PyObject *Py_UNUSED(m), PyObject *args) {
    int sig;
    if (!PyArg_ParseTuple(args, "i", &sig)) return NULL;
    if (prctl(PR_SET_PDEATHSIG, sig) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* munmap(address, length): in a forked pool process, drop a mapping inherited from the
 * training process.  Only for rings, whose Python objects there are never used again. */
static PyObject *core_unmap(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long addr, length;
    if (!PyArg_ParseTuple(args, "KK", &addr, &length)) return NULL;
    if (munmap((void *)(uintptr_t)addr, (size_t)length) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"data_offset", core_data_offset, METH_VARARGS, "data_offset(n_slots, max_workers) -> offset of the slot data"},
    {"layout", core_layout, METH_VARARGS, "layout(n_slots, max_workers) -> offsets of reports, fatal message and data"},
    {"address", core_address, METH_O, "address(buffer) -> address of its first byte"},
    {"unmap", core_unmap, METH_VARARGS, "unmap(address, length): munmap an inherited ring"},
    {"set_pdeathsig", core_set_pdeathsig, METH_VARARGS, "set_pdeathsig(sig): deliver sig to this process when its parent dies"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "shmfeed._core", "shmfeed control plane (see csrc/shmfeed_ctl.h)", -1,
    core_methods,
};

/* Handed to _kernels (kernels_api.h): the one copy of each kernel in the process. */
static const shmf_kernels_api kernels_api = {
    .permute = shmf_permute,
    .block_permute = shmf_block_permute,
    .copy_stream = shmf_copy_stream,
    .gather_rows = shmf_gather_rows,
    .order_init = shmf_order_init,
    .order_map = shmf_order_map,
    .order_batch = shmf_order_batch,
};

PyMODINIT_FUNC PyInit__core(void) {
    refresh_pid();
    if (pthread_atfork(NULL, NULL, refresh_pid) != 0) return PyErr_NoMemory();
    if (PyType_Ready(&ControlType) < 0) return NULL;
    if (PyType_Ready(&SlotRefType) < 0) return NULL;
    if (PyType_Ready(&EpochGuardType) < 0) return NULL;
    if (PyType_Ready(&GatherPlanType) < 0) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "GatherPlan", (PyObject *)&GatherPlanType) < 0) return NULL;
    Py_INCREF(&ControlType);
    if (PyModule_AddObject(m, "Control", (PyObject *)&ControlType) < 0) return NULL;
#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return NULL
    ADD(SHMF_FREE); ADD(SHMF_FILLING); ADD(SHMF_READY); ADD(SHMF_HELD); ADD(SHMF_ERROR); ADD(SHMF_ASSIGNED); ADD(SHMF_ASSIGNING);
    ADD(SHMF_OK); ADD(SHMF_TIMEOUT); ADD(SHMF_STALE); ADD(SHMF_SHUTDOWN); ADD(SHMF_EPOCH_DONE);
    ADD(SHMF_BLOCKED); ADD(SHMF_INTERRUPTED); ADD(SHMF_EINVAL);
    ADD(SHMF_REPORT_BYTES); ADD(SHMF_DATA_ALIGN); ADD(SHMF_VERSION);
#undef ADD
    if (PyModule_AddObject(m, "SHMF_NO_CLAIM", PyLong_FromUnsignedLongLong(SHMF_NO_CLAIM)) < 0)
        return NULL;
    if (PyModule_AddObject(m, "kernels_api",
                           PyCapsule_New((void *)&kernels_api, SHMF_KERNELS_API_CAPSULE, NULL)) < 0)
        return NULL;
    return m;
}
