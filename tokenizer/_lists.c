/* Python lists of token ids from the vocab's shared int objects, one pass.

   lists(table, ids, bounds) -> [[table[i] for i in ids[bounds[d]:bounds[d+1]]] for d in ...]
     table:  list of the ints 0..n (built once by WorldTokenizer)
     ids:    uint16 buffer [n_tokens]
     bounds: int64 buffer [n_docs + 1], non-decreasing, bounds[-1] <= n_tokens

   Each item is the shared object with one reference added: no int is created, and the ids are
   read once (numpy's take + tolist touch each object three times). The plain path it must equal
   is WorldTokenizer._to_lists_numpy (tests/test_tokenizer_lists.py compares them). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* One of the format codes numpy and array.array give a native integer of `size` bytes (unsigned: "H"). */
static int is_int_format(const Py_buffer *b, Py_ssize_t size, const char *codes) {
    const char *f = b->format ? b->format : "B";
    if (*f == '=' || *f == '@')
        f++;
    return b->itemsize == size && f[0] != 0 && f[1] == 0 && strchr(codes, f[0]) != NULL;
}

static PyObject *lists(PyObject *self, PyObject *args) {
    PyObject *table, *ids_obj, *bounds_obj;
    Py_buffer ids = {0}, bounds = {0};
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "O!OO", &PyList_Type, &table, &ids_obj, &bounds_obj))
        return NULL;
    if (PyObject_GetBuffer(ids_obj, &ids, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(bounds_obj, &bounds, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    if (!is_int_format(&ids, 2, "H") || !is_int_format(&bounds, 8, "ql") || bounds.len < 8) {
        PyErr_SetString(PyExc_ValueError, "ids must be a uint16 buffer and bounds an int64 buffer with at least one entry");
        goto done;
    }
    const uint16_t *id = (const uint16_t *)ids.buf;
    const int64_t *bd = (const int64_t *)bounds.buf;
    Py_ssize_t n_ids = ids.len / 2, n_docs = bounds.len / 8 - 1;
    Py_ssize_t n_table = PyList_GET_SIZE(table);
    PyObject **items = ((PyListObject *)table)->ob_item;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        if (bd[d] < 0 || bd[d] > bd[d + 1] || bd[d + 1] > n_ids) {
            PyErr_Format(PyExc_ValueError, "bounds[%zd:%zd] = %lld, %lld is not a range of %zd ids", d, d + 2,
                         (long long)bd[d], (long long)bd[d + 1], n_ids);
            goto done;
        }
    }
    out = PyList_New(n_docs);
    if (!out)
        goto done;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t a = (Py_ssize_t)bd[d], n = (Py_ssize_t)(bd[d + 1] - bd[d]);
        PyObject *doc = PyList_New(n);
        if (!doc) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, d, doc);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint16_t v = id[a + i];
            if (v >= n_table) {
                PyErr_Format(PyExc_ValueError, "id %u at position %zd is not below the table's %zd entries",
                             (unsigned)v, a + i, n_table);
                Py_CLEAR(out);  /* unset items are NULL, which freeing a list allows */
                goto done;
            }
            PyList_SET_ITEM(doc, i, Py_NewRef(items[v]));
        }
    }
done:
    PyBuffer_Release(&ids);
    PyBuffer_Release(&bounds);
    return out;
}

static PyMethodDef methods[] = {
    {"lists", lists, METH_VARARGS, "lists(table, ids uint16, bounds int64) -> list of lists of table items"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lists", "Lists of shared int objects.", -1, methods};

PyMODINIT_FUNC PyInit__lists(void) { return PyModule_Create(&module); }
