/*
 * pyoverlay._native: the lookup hot path in C.
 *
 * whiteout_at(dirfd, name) -> bool: is NAME in the directory DIRFD a char 0/0 whiteout?
 * (More of lookup moves here; see namei.py for the reference in Python.)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

static PyObject *whiteout_at(PyObject *self, PyObject *args)
{
    int dirfd;
    const char *name;
    Py_ssize_t len;
    struct stat st;
    int rc;

    (void)self;
    if (!PyArg_ParseTuple(args, "iy#", &dirfd, &name, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            Py_RETURN_FALSE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(S_ISCHR(st.st_mode) && st.st_rdev == makedev(0, 0));
}

static PyMethodDef methods[] = {
    {"whiteout_at", whiteout_at, METH_VARARGS, "Is NAME in DIRFD a char 0/0 whiteout?"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyoverlay._native", "Native lookup helpers for pyoverlay.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
