/*
 * Thin CPython binding over kernels.c and order.c, which are compiled into _core and
 * reached through its table (kernels_api.h).  Each method maps to one shmf_* kernel: it
 * takes C-contiguous buffers (numpy arrays), checks their item type and lengths,
 * runs the kernel into the caller's output buffer (nothing is allocated here), and
 * turns a kernel status into ValueError.  The kernels are pure, so the GIL is
 * released around them, but only for long arrays: for a batch's few indices,
 * getting the GIL back could cost a switch interval (5 ms) if another thread of the
 * training process holds it, far more than the work.
 *
 * A new kernel: its pointer in kernels_api.h's table (filled in _core.c), a function
 * taking (PyObject *module, PyObject *args) that calls it through K, the buffers
 * through get_array/release_arrays, and one line in kernels_methods.
 *
 * EpochOrder wraps order.h's shmf_order: the one description of an epoch's order,
 * which shmfeed/_order/order.py calls per batch and _core.c's GatherPlan copies (through
 * its capsule, SHMF_ORDER_CAPSULE) for the workers' C loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "kernels_api.h"

#define GIL_RELEASE_MIN_COUNT 4096 /* elements; below this the work is under ~50 us */
#define GATHER_GIL_RELEASE_MIN_BYTES (1 << 20) /* copied; below this, under ~100 us */

/* The kernels and the order, compiled once, into _core (kernels_api.h): set at load. */
static const shmf_kernels_api *K;

/* A C-contiguous buffer of `itemsize`-byte items of kind `kind` ('i' signed integer,
 * 'u' unsigned, 'f' float), described by its struct format. */
static int get_array(PyObject *obj, Py_buffer *view, char kind, Py_ssize_t itemsize, int writable,
                     const char *name) {
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    int ok = view->itemsize == itemsize && strlen(fmt) == 1;
    if (ok) {
        switch (kind) {
        case 'i': ok = strchr("bhilq", *fmt) != NULL; break;
        case 'u': ok = strchr("BHILQ", *fmt) != NULL; break;
        case 'f': ok = strchr("efd", *fmt) != NULL; break;
        default: ok = 0;
        }
    }
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous array of %zd-byte items of kind '%c', "
                     "got format '%s' with %zd-byte items", name, itemsize, kind,
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void release_arrays(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

/* Raise for a kernel's failure; `positions` names the first position outside [0, n). */
static PyObject *order_error(shmf_kstatus st, uint64_t n, uint64_t block, const int64_t *positions,
                             Py_ssize_t count) {
    if (st == SHMF_K_EDOMAIN)
        return PyErr_Format(PyExc_ValueError, "order of n=%llu samples in blocks of %llu: both must be "
                            "in [1, %llu]", (unsigned long long)n, (unsigned long long)block,
                            (unsigned long long)SHMF_ORDER_MAX_N);
    for (Py_ssize_t i = 0; i < count; i++)
        if ((uint64_t)positions[i] >= n)
            return PyErr_Format(PyExc_ValueError, "positions[%zd] = %lld is outside [0, %llu)", i,
                                (long long)positions[i], (unsigned long long)n);
    return PyErr_Format(PyExc_SystemError, "[INTERNAL ERROR] order kernel status %d", (int)st);
}

/* block == 0 selects the plain permutation. */
static shmf_kstatus order_kernel(uint64_t n, uint64_t block, uint64_t key, const int64_t *pos,
                                 int64_t *out, size_t count) {
    return block ? K->block_permute(n, block, key, pos, out, count)
                 : K->permute(n, key, pos, out, count);
}

/* The int64 `positions` and writable `out` of an order call, of equal length, into
 * v[0] and v[1]: their item count, or -1 with an exception set (nothing held). */
static Py_ssize_t get_positions_out(PyObject *pos_obj, PyObject *out_obj, Py_buffer v[2]) {
    if (get_array(pos_obj, &v[0], 'i', 8, 0, "positions") < 0) return -1;
    if (get_array(out_obj, &v[1], 'i', 8, 1, "out") < 0) {
        release_arrays(v, 1);
        return -1;
    }
    Py_ssize_t count = v[0].len / 8;
    if (v[1].len != v[0].len) {
        PyErr_Format(PyExc_ValueError, "out has %zd items, positions %zd: they must match",
                     v[1].len / 8, count);
        release_arrays(v, 2);
        return -1;
    }
    return count;
}

static PyObject *run_order(uint64_t n, uint64_t block, uint64_t key, PyObject *pos_obj,
                           PyObject *out_obj) {
    Py_buffer v[2];
    Py_ssize_t count = get_positions_out(pos_obj, out_obj, v);
    if (count < 0) return NULL;
    const int64_t *pos = v[0].buf;
    int64_t *out = v[1].buf;
    shmf_kstatus st;
    if (count >= GIL_RELEASE_MIN_COUNT) {
        Py_BEGIN_ALLOW_THREADS
        st = order_kernel(n, block, key, pos, out, (size_t)count);
        Py_END_ALLOW_THREADS
    } else {
        st = order_kernel(n, block, key, pos, out, (size_t)count);
    }
    PyObject *r = st == SHMF_K_OK ? Py_NewRef(Py_None) : order_error(st, n, block, pos, count);
    release_arrays(v, 2);
    return r;
}

static PyObject *kernels_permute(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long n, key;
    PyObject *pos, *out;
    if (!PyArg_ParseTuple(args, "KKOO", &n, &key, &pos, &out)) return NULL;
    return run_order(n, 0, key, pos, out);
}

static PyObject *kernels_block_permute(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long n, block, key;
    PyObject *pos, *out;
    if (!PyArg_ParseTuple(args, "KKKOO", &n, &block, &key, &pos, &out)) return NULL;
    if (block == 0) return PyErr_Format(PyExc_ValueError, "block must be >= 1 sample, got 0");
    return run_order(n, block, key, pos, out);
}

/* gather_rows(src, src_stride, row_bytes, indices, out): rows of a byte buffer into out.
 * Row i of src is bytes [i * src_stride, i * src_stride + row_bytes); the rows that fit
 * in src are the valid indices. */
static PyObject *kernels_gather_rows(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *src_obj, *idx_obj, *out_obj;
    Py_ssize_t stride, row_bytes;
    if (!PyArg_ParseTuple(args, "OnnOO", &src_obj, &stride, &row_bytes, &idx_obj, &out_obj))
        return NULL;
    if (stride < 1 || row_bytes < 1)
        return PyErr_Format(PyExc_ValueError, "src_stride (%zd) and row_bytes (%zd) must be >= 1",
                            stride, row_bytes);
    Py_buffer v[3];
    if (PyObject_GetBuffer(src_obj, &v[0], PyBUF_SIMPLE) < 0) return NULL;
    if (get_array(idx_obj, &v[1], 'i', 8, 0, "indices") < 0) {
        release_arrays(v, 1);
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &v[2], PyBUF_WRITABLE) < 0) {
        release_arrays(v, 2);
        return NULL;
    }
    Py_ssize_t count = v[1].len / 8;
    uint64_t n_rows = shmf_rows_in((uint64_t)v[0].len, (uint64_t)stride, (uint64_t)row_bytes);
    PyObject *r = NULL;
    if (count > v[2].len / row_bytes) {
        PyErr_Format(PyExc_ValueError, "out holds %zd rows of %zd bytes, %zd indices given",
                     v[2].len / row_bytes, row_bytes, count);
    } else {
        const int64_t *idx = v[1].buf;
        shmf_kstatus st;
        if ((uint64_t)count * (uint64_t)row_bytes >= GATHER_GIL_RELEASE_MIN_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            st = K->gather_rows(v[0].buf, n_rows, (size_t)stride, (size_t)row_bytes, idx,
                                  (size_t)count, v[2].buf);
            Py_END_ALLOW_THREADS
        } else {
            st = K->gather_rows(v[0].buf, n_rows, (size_t)stride, (size_t)row_bytes, idx,
                                  (size_t)count, v[2].buf);
        }
        if (st == SHMF_K_OK) {
            r = Py_NewRef(Py_None);
        } else {
            Py_ssize_t i = 0;
            while (i < count && (uint64_t)idx[i] < n_rows) i++;
            PyErr_Format(PyExc_IndexError, "indices[%zd] = %lld is outside the source's %llu rows",
                         i, i < count ? (long long)idx[i] : -1LL, (unsigned long long)n_rows);
        }
    }
    release_arrays(v, 3);
    return r;
}

/* stack_rows(out, rows, array_type, format, shape, stream=False): row k of out = the bytes of rows[k],
 * for each rows[k] that is an `array_type` (numpy.ndarray, or a subclass: a memmap's
 * rows are np.memmap), C-contiguous, of
 * struct format `format` and shape `shape`; stops at the first that is not and returns
 * its position (rows before it are written), or -1 when every row was written.  The
 * caller checks, converts or rejects the rest in Python, naming the sample.  Not a
 * kernel of kernels.c: it reads Python objects, so it runs with the GIL (32 rows of a
 * batch are microseconds of copying).  `stream`: copy with non-temporal stores
 * (shmf_copy_stream), for the rows of a slot too large to stay in cache until read. */
static PyObject *kernels_stack_rows(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *out_obj, *rows, *array_type, *shape;
    const char *want_fmt;
    int stream = 0;
    if (!PyArg_ParseTuple(args, "OO!OsO!|p", &out_obj, &PyTuple_Type, &rows, &array_type, &want_fmt,
                          &PyTuple_Type, &shape, &stream))
        return NULL;
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    Py_ssize_t dims[8];
    if (ndim < 1 || ndim > 8) return PyErr_Format(PyExc_ValueError, "shape must have 1-8 dimensions, got %zd", ndim);
    for (Py_ssize_t d = 0; d < ndim; d++) {
        dims[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, d));
        if (dims[d] < 0) return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "negative dimension");
    }
    Py_buffer out;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(rows), k = 0, row_bytes = -1;
    for (; k < n; k++) {
        PyObject *row = PyTuple_GET_ITEM(rows, k);
        if (!PyObject_TypeCheck(row, (PyTypeObject *)array_type)) break;
        Py_buffer v;
        if (PyObject_GetBuffer(row, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear(); /* e.g. not contiguous: the Python path copes */
            break;
        }
        int ok = v.ndim == ndim && v.format != NULL && strcmp(v.format, want_fmt) == 0;
        for (Py_ssize_t d = 0; ok && d < ndim; d++) ok = v.shape[d] == dims[d];
        if (ok && row_bytes < 0) row_bytes = v.len;
        ok = ok && v.len == row_bytes && (k + 1) * row_bytes <= out.len;
        if (ok && stream)
            K->copy_stream((char *)out.buf + k * row_bytes, v.buf, (size_t)row_bytes);
        else if (ok)
            memcpy((char *)out.buf + k * row_bytes, v.buf, (size_t)row_bytes);
        PyBuffer_Release(&v);
        if (!ok) break;
    }
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(k == n ? -1 : k);
}


/* ---- EpochOrder: order.h's shmf_order ------------------------------------------- */

typedef struct {
    PyObject_HEAD
    shmf_order order;
    int drop_last;
} EpochOrderObject;

static int EpochOrder_init(EpochOrderObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n_items", "batch_size", "shard_count", "shard_index", "drop_last",
                             "shuffle", "shuffle_block", NULL};
    unsigned long long n, bs, count, index, block;
    int drop_last, shuffle;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKKpiK", kwlist, &n, &bs, &count, &index,
                                     &drop_last, &shuffle, &block))
        return -1;
    if (K->order_init(&self->order, n, bs, count, index, drop_last, shuffle, block) != SHMF_K_OK) {
        PyErr_Format(PyExc_ValueError, "EpochOrder(n_items=%llu, batch_size=%llu, shard_count=%llu, "
                     "shard_index=%llu, shuffle=%d, shuffle_block=%llu): outside what order.h accepts",
                     n, bs, count, index, shuffle, block);
        return -1;
    }
    self->drop_last = drop_last;
    return 0;
}

/* batch(key, b, out): the samples of this host's batch b into out (int64, rows(b) items). */
static PyObject *EpochOrder_batch(EpochOrderObject *self, PyObject *args) {
    unsigned long long key, b;
    PyObject *out_obj;
    if (!PyArg_ParseTuple(args, "KKO", &key, &b, &out_obj)) return NULL;
    Py_buffer v;
    if (get_array(out_obj, &v, 'i', 8, 1, "out") < 0) return NULL;
    uint64_t rows = shmf_order_rows(&self->order, b);
    PyObject *r = NULL;
    if (rows == 0)
        PyErr_Format(PyExc_IndexError, "batch %llu is outside the epoch's %llu batches", b,
                     (unsigned long long)self->order.n_batches);
    else if ((uint64_t)v.len / 8 != rows)
        PyErr_Format(PyExc_ValueError, "out has %zd items, batch %llu has %llu rows", v.len / 8, b,
                     (unsigned long long)rows);
    else if (K->order_batch(&self->order, key, b, v.buf) != SHMF_K_OK)
        PyErr_SetString(PyExc_SystemError, "[INTERNAL ERROR] shmf_order_batch failed on a batch it has");
    else
        r = Py_NewRef(Py_None);
    PyBuffer_Release(&v);
    return r;
}

/* indices(key, positions, out): out[i] = sample at positions[i] (int64; out may be positions). */
static PyObject *EpochOrder_indices(EpochOrderObject *self, PyObject *args) {
    unsigned long long key;
    PyObject *pos_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "KOO", &key, &pos_obj, &out_obj)) return NULL;
    Py_buffer v[2];
    Py_ssize_t count = get_positions_out(pos_obj, out_obj, v);
    if (count < 0) return NULL;
    const int64_t *pos = v[0].buf;
    shmf_kstatus st;
    if (count >= GIL_RELEASE_MIN_COUNT) {
        Py_BEGIN_ALLOW_THREADS
        st = K->order_map(&self->order, key, pos, v[1].buf, (size_t)count);
        Py_END_ALLOW_THREADS
    } else {
        st = K->order_map(&self->order, key, pos, v[1].buf, (size_t)count);
    }
    PyObject *r = st == SHMF_K_OK ? Py_NewRef(Py_None)
                                  : order_error(st, self->order.n_items, self->order.shuffle_block, pos, count);
    release_arrays(v, 2);
    return r;
}

static PyObject *EpochOrder_rows(EpochOrderObject *self, PyObject *arg) {
    unsigned long long b = PyLong_AsUnsignedLongLong(arg);
    if (b == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(shmf_order_rows(&self->order, b));
}

/* Picklable: a Loader's Order travels to its workers. */
static PyObject *EpochOrder_reduce(EpochOrderObject *self, PyObject *Py_UNUSED(a)) {
    const shmf_order *o = &self->order;
    return Py_BuildValue("O(KKKKiiK)", (PyObject *)Py_TYPE(self), (unsigned long long)o->n_items,
                         (unsigned long long)o->batch_size, (unsigned long long)o->shard_count,
                         (unsigned long long)o->shard_index, self->drop_last, o->shuffle,
                         (unsigned long long)o->shuffle_block);
}

static PyObject *EpochOrder_capsule(EpochOrderObject *self, void *Py_UNUSED(c)) {
    /* Points into self: the reader copies the struct while it holds self. */
    return PyCapsule_New(&self->order, SHMF_ORDER_CAPSULE, NULL);
}

#define ORDER_FIELD(name) \
    static PyObject *EpochOrder_##name(EpochOrderObject *self, void *Py_UNUSED(c)) { \
        return PyLong_FromUnsignedLongLong(self->order.name); \
    }
ORDER_FIELD(n_items)
ORDER_FIELD(batch_size)
ORDER_FIELD(full_batches)
ORDER_FIELD(tail_rows)
ORDER_FIELD(n_batches)

static PyGetSetDef EpochOrder_getset[] = {
    {"n_items", (getter)EpochOrder_n_items, NULL, "positions of an epoch", NULL},
    {"batch_size", (getter)EpochOrder_batch_size, NULL, "rows of a host's full batch", NULL},
    {"full_batches", (getter)EpochOrder_full_batches, NULL, "batches of batch_size rows", NULL},
    {"tail_rows", (getter)EpochOrder_tail_rows, NULL, "rows of the partial last batch (0: none)", NULL},
    {"n_batches", (getter)EpochOrder_n_batches, NULL, "batches per epoch, per host", NULL},
    {"capsule", (getter)EpochOrder_capsule, NULL, "the shmf_order struct, for _core.GatherPlan", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef EpochOrder_methods[] = {
    {"batch", (PyCFunction)EpochOrder_batch, METH_VARARGS,
     "batch(key, b, out): the samples of this host's batch b of the epoch keyed by key into out "
     "(int64, rows(b) items)"},
    {"indices", (PyCFunction)EpochOrder_indices, METH_VARARGS,
     "indices(key, positions, out): out[i] = the sample at positions[i] (int64; out may be positions)"},
    {"rows", (PyCFunction)EpochOrder_rows, METH_O, "rows(b): rows of this host's batch b; 0 past the end"},
    {"__reduce__", (PyCFunction)EpochOrder_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EpochOrderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfeed._kernels.EpochOrder",
    .tp_basicsize = sizeof(EpochOrderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "EpochOrder(n_items, batch_size, shard_count, shard_index, drop_last, shuffle, "
              "shuffle_block): an epoch's order (csrc/order.h)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EpochOrder_init,
    .tp_methods = EpochOrder_methods,
    .tp_getset = EpochOrder_getset,
};

static PyMethodDef kernels_methods[] = {
    {"stack_rows", kernels_stack_rows, METH_VARARGS,
     "stack_rows(out, rows, array_type, format, shape, stream=False): copy each row (an "
     "array_type, C-contiguous, of that struct format and shape) into out's rows in turn "
     "(with non-temporal stores if `stream`); -1 when all were copied, else the position of "
     "the first that was not"},
    {"gather_rows", kernels_gather_rows, METH_VARARGS,
     "gather_rows(src, src_stride, row_bytes, indices, out): out's rows k = src bytes "
     "[indices[k] * src_stride, + row_bytes), for int64 indices (large gathers bypass the cache)"},
    {"permute", kernels_permute, METH_VARARGS,
     "permute(n, key, positions, out): out[i] = sample at positions[i] of the order keyed by key "
     "on [0, n) (int64 arrays; out may be positions)"},
    {"block_permute", kernels_block_permute, METH_VARARGS,
     "block_permute(n, block, key, positions, out): the same, with runs of `block` consecutive "
     "samples kept together"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "shmfeed._kernels", "shmfeed hot loops (see csrc/kernels.h)", -1,
    kernels_methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    /* Imported by name, not with PyCapsule_Import: that only looks up attributes,
     * and `shmfeed` is still importing (its _core attribute not set yet) here. */
    PyObject *core = PyImport_ImportModule("shmfeed._core");
    if (!core) return NULL;
    PyObject *cap = PyObject_GetAttrString(core, "kernels_api");
    Py_DECREF(core);
    if (!cap) return NULL;
    K = PyCapsule_GetPointer(cap, SHMF_KERNELS_API_CAPSULE); /* a static table of _core's */
    Py_DECREF(cap);
    if (!K) return NULL;
    if (PyType_Ready(&EpochOrderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&kernels_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "EpochOrder", (PyObject *)&EpochOrderType) < 0) return NULL;
    if (PyModule_AddIntConstant(m, "SHUFFLE_NONE", SHMF_SHUFFLE_NONE) < 0 ||
        PyModule_AddIntConstant(m, "SHUFFLE_FULL", SHMF_SHUFFLE_FULL) < 0 ||
        PyModule_AddIntConstant(m, "SHUFFLE_BLOCK", SHMF_SHUFFLE_BLOCK) < 0)
        return NULL;
    if (PyModule_AddObject(m, "ORDER_MAX_N", PyLong_FromUnsignedLongLong(SHMF_ORDER_MAX_N)) < 0)
        return NULL;
    if (PyModule_AddIntConstant(m, "GIL_RELEASE_MIN_COUNT", GIL_RELEASE_MIN_COUNT) < 0) return NULL;
    if (PyModule_AddObject(m, "STREAM_MIN_BYTES", PyLong_FromUnsignedLongLong(SHMF_STREAM_MIN_BYTES)) < 0)
        return NULL;
    return m;
}
