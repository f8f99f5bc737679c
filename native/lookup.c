/*
 * pyoverlay._native: the lookup and readdir hot paths in C.
 *
 * The rules live in ovl_fs.h (plain C); this file only converts between Python and C.
 * pyoverlay/native.py is the only caller; it builds the same objects namei.py and
 * readdir.py build. Both functions return NotImplemented when they meet a case they
 * leave to the Python reference (a redirect, an error the reference would raise), so the
 * two paths always agree.
 *
 * lookup(name, fds, xwhiteouts) -> None | NotImplemented | (is_dir, hits, markers, stat)
 *     fds[i]: fd of the parent directory in candidate layer i, or None/-1 when missing;
 *     xwhiteouts[i]: that parent copy holds xattr whiteouts (overlay.opaque = "x").
 *     hits: candidate indexes holding NAME, topmost first (one for a non-directory);
 *     markers: per hit, OPAQUE | XWHITEOUTS bits; stat: of the top hit,
 *     (mode, ino, dev, nlink, uid, gid, rdev, size, mtime_ns).
 *
 * merged_names(dirs) -> list[bytes] | NotImplemented
 *     dirs: per layer copy, topmost first, (fd or None, xwhiteouts, open_flags); the
 *     directory is read through a fresh open of "." (open_flags added, e.g. O_NOATIME) so
 *     the shared fd's offset is never moved.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>

#include "ovl_fs.h"

#define DENTS_BUF_SIZE (64 * 1024)
/* Candidate lists up to this size live on the C stack; longer ones are malloc'ed. */
#define SMALL_STACK 32

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
    return PyBool_FromLong(ovl_is_whiteout_st(&st));
}

/* An fd from a Python int or None (missing: -1). */
static int fd_from_object(PyObject *obj, int *fd)
{
    long value;

    if (obj == Py_None) {
        *fd = -1;
        return 0;
    }
    value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < -1 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd out of range");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

static PyObject *stat_tuple(const struct stat *st)
{
    return Py_BuildValue("(IKKKIIKLL)", (unsigned int)st->st_mode,
                         (unsigned long long)st->st_ino, (unsigned long long)st->st_dev,
                         (unsigned long long)st->st_nlink, (unsigned int)st->st_uid,
                         (unsigned int)st->st_gid, (unsigned long long)st->st_rdev,
                         (long long)st->st_size,
                         (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec);
}

static PyObject *lookup_result(const struct ovl_lookup *out)
{
    PyObject *hits = PyTuple_New(out->nhits);
    PyObject *markers = PyTuple_New(out->is_dir ? out->nhits : 0);
    PyObject *st = stat_tuple(&out->st);
    int i;

    if (hits == NULL || markers == NULL || st == NULL)
        goto fail;
    for (i = 0; i < out->nhits; i++) {
        PyObject *index = PyLong_FromLong(out->hits[i].index);
        if (index == NULL)
            goto fail;
        PyTuple_SET_ITEM(hits, i, index);
        if (out->is_dir) {
            PyObject *bits = PyLong_FromLong(out->hits[i].markers);
            if (bits == NULL)
                goto fail;
            PyTuple_SET_ITEM(markers, i, bits);
        }
    }
    return Py_BuildValue("(ONNN)", out->is_dir ? Py_True : Py_False, hits, markers, st);
fail:
    Py_XDECREF(hits);
    Py_XDECREF(markers);
    Py_XDECREF(st);
    return NULL;
}

/* Fill FDS and XWH from the two Python sequences (already PySequence_Fast, length N). */
static int read_candidates(PyObject *fds_seq, PyObject *xwh_seq, Py_ssize_t n, int *fds,
                           unsigned char *xwh)
{
    PyObject **fd_items = PySequence_Fast_ITEMS(fds_seq);
    PyObject **xwh_items = PySequence_Fast_ITEMS(xwh_seq);
    Py_ssize_t i;

    for (i = 0; i < n; i++) {
        int truth;
        if (fd_from_object(fd_items[i], &fds[i]) < 0)
            return -1;
        truth = PyObject_IsTrue(xwh_items[i]);
        if (truth < 0)
            return -1;
        xwh[i] = (unsigned char)truth;
    }
    return 0;
}

static PyObject *run_lookup(const char *name, Py_ssize_t len, PyObject *fds_seq,
                            PyObject *xwh_seq, Py_ssize_t n)
{
    int small_fds[SMALL_STACK];
    unsigned char small_xwh[SMALL_STACK];
    struct ovl_hit small_hits[SMALL_STACK];
    int *fds = small_fds;
    unsigned char *xwh = small_xwh;
    struct ovl_lookup out = {.hits = small_hits};
    PyObject *result = NULL;
    int rc;

    if (n > SMALL_STACK) {
        fds = PyMem_Malloc(sizeof(int) * (size_t)n);
        xwh = PyMem_Malloc((size_t)n);
        out.hits = PyMem_Malloc(sizeof(struct ovl_hit) * (size_t)n);
        if (fds == NULL || xwh == NULL || out.hits == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (read_candidates(fds_seq, xwh_seq, n, fds, xwh) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = ovl_lookup_child(fds, xwh, (int)n, name, (size_t)len, &out);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        result = PyErr_SetFromErrno(PyExc_OSError);
    else if (rc == OVL_DECLINE)
        result = Py_NewRef(Py_NotImplemented);
    else if (rc == OVL_NO)
        result = Py_NewRef(Py_None);
    else
        result = lookup_result(&out);
done:
    if (n > SMALL_STACK) {
        PyMem_Free(fds);
        PyMem_Free(xwh);
        PyMem_Free(out.hits);
    }
    return result;
}

static PyObject *lookup(PyObject *self, PyObject *args)
{
    const char *name;
    Py_ssize_t len, n;
    PyObject *fds_obj, *xwh_obj, *fds_seq = NULL, *xwh_seq = NULL, *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "y#OO", &name, &len, &fds_obj, &xwh_obj))
        return NULL;
    /* Names the kernel would never hand us (".", "..", "a/b", NUL) are the reference's. */
    if (!ovl_plain_name(name, (size_t)len))
        Py_RETURN_NOTIMPLEMENTED;
    fds_seq = PySequence_Fast(fds_obj, "fds must be a sequence");
    xwh_seq = PySequence_Fast(xwh_obj, "xwhiteouts must be a sequence");
    if (fds_seq == NULL || xwh_seq == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(fds_seq);
    if (PySequence_Fast_GET_SIZE(xwh_seq) != n || n > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "fds and xwhiteouts differ in length");
        goto done;
    }
    result = run_lookup(name, len, fds_seq, xwh_seq, n);
done:
    Py_XDECREF(fds_seq);
    Py_XDECREF(xwh_seq);
    return result;
}

/* -- lookup_child: the whole of namei.lookup_child's common case in one call ------- */

static PyObject *str_path, *str_layers, *str_markers, *str_xattr_whiteouts, *str_fd, *str_index,
    *str_move_to_end;
/* DirMarkers for each OPAQUE | XWHITEOUTS combination, set once by set_markers(). */
static PyObject *markers_table;

/* What lookup_child's callback needs to reach the layer stack's fd cache. */
struct stack_ctx {
    PyObject *dirs;       /* the stack's {(layer index, relpath): fd} cache, or NULL */
    PyObject *try_dir_fd; /* stack.try_dir_fd */
    PyObject **layers;    /* per candidate: the Layer (borrowed) */
    PyObject **rels;      /* per candidate: the parent's relpath (borrowed) */
    PyObject *name;       /* the name looked up (bytes) */
};

/* REL + "/" + NAME, or NAME when REL is empty (layers.join). */
static PyObject *join_bytes(PyObject *rel, PyObject *name)
{
    Py_ssize_t a = PyBytes_GET_SIZE(rel), b = PyBytes_GET_SIZE(name);
    PyObject *out;

    if (a == 0)
        return Py_NewRef(name);
    out = PyBytes_FromStringAndSize(NULL, a + 1 + b);
    if (out == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(rel), (size_t)a);
    PyBytes_AS_STRING(out)[a] = '/';
    memcpy(PyBytes_AS_STRING(out) + a + 1, PyBytes_AS_STRING(name), (size_t)b);
    return out;
}

/* An OSError becomes OVL_DECLINE (the reference raises it itself); others stay errors. */
static int decline_os_error(void)
{
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
        PyErr_Clear();
        return OVL_DECLINE;
    }
    return -1;
}

/*
 * The fd of directory REL in LAYER, as stack.try_dir_fd gives it (-1: not a directory
 * there), taken straight from the cache when it is there (and marked recently used, as
 * try_dir_fd would). OVL_YES, OVL_DECLINE or -1.
 */
static int stack_dir_fd(struct stack_ctx *ctx, PyObject *layer, PyObject *rel, int *fd)
{
    PyObject *index, *key = NULL, *value = NULL, *res;
    int rc = -1;

    if (ctx->dirs != NULL) {
        index = PyObject_GetAttr(layer, str_index);
        if (index == NULL)
            return -1;
        key = PyTuple_Pack(2, index, rel);
        Py_DECREF(index);
        if (key == NULL)
            return -1;
        value = PyDict_GetItemWithError(ctx->dirs, key);
        if (value == NULL && PyErr_Occurred())
            goto done;
    }
    if (value != NULL && PyLong_CheckExact(value)) {
        if (fd_from_object(value, fd) < 0)
            goto done;
        res = PyObject_CallMethodOneArg(ctx->dirs, str_move_to_end, key);
        Py_XDECREF(res);
        rc = res ? OVL_YES : -1;
        goto done;
    }
    res = PyObject_CallFunctionObjArgs(ctx->try_dir_fd, layer, rel, NULL);
    if (res == NULL) {
        rc = decline_os_error();
        goto done;
    }
    rc = fd_from_object(res, fd) < 0 ? -1 : OVL_YES;
    Py_DECREF(res);
done:
    Py_XDECREF(key);
    return rc;
}

static int stack_child_markers(void *arg, int i, int dirfd, const char *name, int *markers)
{
    struct stack_ctx *ctx = arg;
    PyObject *rel = join_bytes(ctx->rels[i], ctx->name);
    int fd, rc;

    (void)dirfd;
    (void)name;
    *markers = 0;
    if (rel == NULL)
        return -1;
    rc = stack_dir_fd(ctx, ctx->layers[i], rel, &fd);
    Py_DECREF(rel);
    if (rc != OVL_YES || fd < 0)
        return rc; /* not a directory reached without symlinks: no markers */
    rc = ovl_dir_markers(fd, markers);
    if (rc < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    return rc;
}

/* Build the Resolved the reference would build, with the class of PARENT. */
static PyObject *build_resolved(PyObject *parent, PyObject *path, PyObject *name,
                                struct stack_ctx *ctx, const struct ovl_lookup *out)
{
    PyObject *full = join_bytes(path, name), *found = PyTuple_New(out->nhits), *marks = NULL;
    PyObject *result = NULL;
    int i;

    if (full == NULL || found == NULL)
        goto done;
    if (out->is_dir && (marks = PyTuple_New(out->nhits)) == NULL)
        goto done;
    for (i = 0; i < out->nhits; i++) {
        int c = out->hits[i].index;
        PyObject *rel = join_bytes(ctx->rels[c], name);
        PyObject *pair = rel ? PyTuple_Pack(2, ctx->layers[c], rel) : NULL;
        Py_XDECREF(rel);
        if (pair == NULL)
            goto done;
        PyTuple_SET_ITEM(found, i, pair);
        if (marks != NULL)
            PyTuple_SET_ITEM(marks, i,
                             Py_NewRef(PyTuple_GET_ITEM(markers_table, out->hits[i].markers)));
    }
    if (marks != NULL)
        result = PyObject_CallFunctionObjArgs((PyObject *)Py_TYPE(parent), full, found, Py_True,
                                              marks, NULL);
    else
        result = PyObject_CallFunctionObjArgs((PyObject *)Py_TYPE(parent), full, found,
                                              Py_False, NULL);
done:
    Py_XDECREF(full);
    Py_XDECREF(found);
    Py_XDECREF(marks);
    return result;
}

/* Fill the candidate arrays from PARENT's layers and markers. OVL_YES, OVL_DECLINE, -1. */
static int gather(struct stack_ctx *ctx, PyObject *path, PyObject *layers, PyObject *markers,
                  Py_ssize_t n, int *fds, unsigned char *xwh)
{
    Py_ssize_t i;
    int rc;

    for (i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(layers, i), *flag;
        int truth;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "parent.layers must hold (Layer, bytes) pairs");
            return -1;
        }
        ctx->layers[i] = PyTuple_GET_ITEM(pair, 0);
        ctx->rels[i] = PyTuple_GET_ITEM(pair, 1);
        /* A redirected parent (relpath other than the merged path) is the reference's. */
        if (PyBytes_GET_SIZE(ctx->rels[i]) != PyBytes_GET_SIZE(path) ||
            memcmp(PyBytes_AS_STRING(ctx->rels[i]), PyBytes_AS_STRING(path),
                   (size_t)PyBytes_GET_SIZE(path)) != 0)
            return OVL_DECLINE;
        if (PyBytes_GET_SIZE(path) == 0) {
            PyObject *fd = PyObject_GetAttr(ctx->layers[i], str_fd);
            rc = fd ? fd_from_object(fd, &fds[i]) : -1;
            Py_XDECREF(fd);
            if (rc < 0)
                return -1;
        } else if ((rc = stack_dir_fd(ctx, ctx->layers[i], ctx->rels[i], &fds[i])) != OVL_YES) {
            return rc;
        }
        flag = PyObject_GetAttr(PyTuple_GET_ITEM(markers, i), str_xattr_whiteouts);
        truth = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (truth < 0)
            return -1;
        xwh[i] = (unsigned char)truth;
    }
    return OVL_YES;
}

static size_t count_slashes(PyObject *path)
{
    const char *p = PyBytes_AS_STRING(path), *end = p + PyBytes_GET_SIZE(path);
    size_t count = 0;

    while ((p = memchr(p, '/', (size_t)(end - p))) != NULL) {
        count++;
        p++;
    }
    return count;
}

static PyObject *walk_parent(PyObject *parent, PyObject *name, struct stack_ctx *ctx,
                             PyObject *path, PyObject *layers, PyObject *markers, Py_ssize_t n)
{
    int small_fds[SMALL_STACK];
    unsigned char small_xwh[SMALL_STACK];
    struct ovl_hit small_hits[SMALL_STACK];
    PyObject *small_objs[2 * SMALL_STACK];
    int *fds = small_fds;
    unsigned char *xwh = small_xwh;
    PyObject **objs = small_objs, *result = NULL;
    struct ovl_lookup out = {.hits = small_hits, .child_markers = stack_child_markers, .ctx = ctx};
    int rc;

    if (n > SMALL_STACK) {
        fds = PyMem_Malloc(sizeof(int) * (size_t)n);
        xwh = PyMem_Malloc((size_t)n);
        out.hits = PyMem_Malloc(sizeof(struct ovl_hit) * (size_t)n);
        objs = PyMem_Malloc(sizeof(PyObject *) * 2 * (size_t)n);
        if (!fds || !xwh || !out.hits || !objs) {
            PyErr_NoMemory();
            goto done;
        }
    }
    ctx->layers = objs;
    ctx->rels = objs + n;
    rc = gather(ctx, path, layers, markers, n, fds, xwh);
    if (rc == OVL_YES)
        rc = ovl_lookup_child(fds, xwh, (int)n, PyBytes_AS_STRING(name),
                              (size_t)PyBytes_GET_SIZE(name), &out);
    if (rc < 0) {
        if (!PyErr_Occurred())
            PyErr_SetFromErrno(PyExc_OSError);
    } else if (rc == OVL_DECLINE) {
        result = Py_NewRef(Py_NotImplemented);
    } else if (rc == OVL_NO) {
        result = Py_NewRef(Py_None);
    } else {
        result = build_resolved(parent, path, name, ctx, &out);
    }
done:
    if (n > SMALL_STACK) {
        PyMem_Free(fds);
        PyMem_Free(xwh);
        PyMem_Free(out.hits);
        PyMem_Free(objs);
    }
    return result;
}

/*
 * lookup_child(parent, name, dirs, try_dir_fd, cache_size) -> Resolved | None | NotImplemented
 *
 * PARENT is a namei.Resolved directory; DIRS the stack's fd cache (read as try_dir_fd
 * does, or None), TRY_DIR_FD the stack's method, CACHE_SIZE the cache's bound.
 */
static PyObject *lookup_child(PyObject *self, PyObject *args)
{
    PyObject *parent, *name, *dirs, *try_dir_fd, *path = NULL, *layers = NULL, *markers = NULL;
    PyObject *result = NULL;
    Py_ssize_t cache_size, n;
    struct stack_ctx ctx;

    (void)self;
    if (!PyArg_ParseTuple(args, "OSOOn", &parent, &name, &dirs, &try_dir_fd, &cache_size))
        return NULL;
    if (markers_table == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_markers() was not called");
        return NULL;
    }
    if (!ovl_plain_name(PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name)))
        Py_RETURN_NOTIMPLEMENTED;
    path = PyObject_GetAttr(parent, str_path);
    layers = PyObject_GetAttr(parent, str_layers);
    markers = PyObject_GetAttr(parent, str_markers);
    if (!path || !layers || !markers)
        goto done;
    if (!PyBytes_CheckExact(path) || !PyTuple_CheckExact(layers) ||
        !PyTuple_CheckExact(markers) || PyTuple_GET_SIZE(markers) != PyTuple_GET_SIZE(layers)) {
        PyErr_SetString(PyExc_TypeError, "parent is not a Resolved directory");
        goto done;
    }
    n = PyTuple_GET_SIZE(layers);
    /*
     * Every fd we hold must stay open until we are done: the cache closes its least
     * recently used fd when it opens a new one, and a lookup touches at most depth + 3
     * entries per layer. Beyond that, the reference (which uses each fd at once) answers.
     */
    if ((size_t)n * (count_slashes(path) + 3) >= (size_t)cache_size || n > INT_MAX) {
        result = Py_NewRef(Py_NotImplemented);
        goto done;
    }
    ctx.dirs = PyDict_Check(dirs) ? dirs : NULL;
    ctx.try_dir_fd = try_dir_fd;
    ctx.name = name;
    result = walk_parent(parent, name, &ctx, path, layers, markers, n);
done:
    Py_XDECREF(path);
    Py_XDECREF(layers);
    Py_XDECREF(markers);
    return result;
}

static PyObject *set_markers(PyObject *self, PyObject *table)
{
    (void)self;
    if (!PyTuple_CheckExact(table) || PyTuple_GET_SIZE(table) != 4) {
        PyErr_SetString(PyExc_TypeError, "set_markers wants a tuple of 4 DirMarkers");
        return NULL;
    }
    Py_XSETREF(markers_table, Py_NewRef(table));
    Py_RETURN_NONE;
}

/* -- merged readdir ---------------------------------------------------------------- */

/* The state of one merged listing: names shown, names hidden from the layers below. */
struct listing {
    PyObject *names;  /* list, in order */
    PyObject *seen;   /* set */
    PyObject *hidden; /* set */
    PyObject *layer_hidden; /* set: hidden by the layer being read */
};

/*
 * Take in one directory entry. Returns 0, -1 on a Python error, or OVL_DECLINE.
 */
static int take_entry(struct listing *ls, int dirfd, const struct dirent64 *d, bool xwh)
{
    size_t len = strlen(d->d_name);
    PyObject *name;
    int r, rc = 0;

    if (d->d_name[0] == '.' && (len == 1 || (len == 2 && d->d_name[1] == '.')))
        return 0;
    name = PyBytes_FromStringAndSize(d->d_name, (Py_ssize_t)len);
    if (name == NULL)
        return -1;
    r = PySet_Contains(ls->seen, name);
    if (r == 0)
        r = PySet_Contains(ls->hidden, name);
    if (r != 0) {
        Py_DECREF(name);
        return r < 0 ? -1 : 0;
    }
    if (ovl_is_whiteout_name(d->d_name, len)) {
        /* ".wh.NAME" hides NAME in the layers below, never itself shown */
        PyObject *target = PyBytes_FromStringAndSize(d->d_name + OVL_WHITEOUT_PREFIX_LEN,
                                                     (Py_ssize_t)(len - OVL_WHITEOUT_PREFIX_LEN));
        rc = target ? PySet_Add(ls->layer_hidden, target) : -1;
        Py_XDECREF(target);
    } else {
        r = ovl_entry_is_whiteout(dirfd, d->d_name, d->d_type, xwh);
        if (r == OVL_DECLINE)
            rc = OVL_DECLINE;
        else if (r == OVL_YES)
            rc = PySet_Add(ls->layer_hidden, name);
        else if (PySet_Add(ls->seen, name) < 0 || PyList_Append(ls->names, name) < 0)
            rc = -1;
    }
    Py_DECREF(name);
    return rc;
}

/* Read every entry of the directory DIRFD into LS. 0, -1 (Python error) or OVL_DECLINE. */
static int read_layer(struct listing *ls, int dirfd, bool xwh, char *buf)
{
    for (;;) {
        ssize_t n, off;
        Py_BEGIN_ALLOW_THREADS
        n = getdents64(dirfd, buf, DENTS_BUF_SIZE);
        Py_END_ALLOW_THREADS
        if (n < 0)
            return OVL_DECLINE; /* the reference raises: let it */
        if (n == 0)
            return 0;
        for (off = 0; off < n;) {
            const struct dirent64 *d = (const struct dirent64 *)(buf + off);
            int rc = take_entry(ls, dirfd, d, xwh);
            if (rc != 0)
                return rc;
            off += d->d_reclen;
        }
    }
}

/* hidden |= layer_hidden - seen: a ".wh.NAME" hides NAME below, not in its own layer. */
static int merge_hidden(struct listing *ls)
{
    PyObject *it = PyObject_GetIter(ls->layer_hidden), *key;
    int rc = it ? 0 : -1;

    while (rc == 0 && it && (key = PyIter_Next(it)) != NULL) {
        int r = PySet_Contains(ls->seen, key);
        if (r < 0 || (r == 0 && PySet_Add(ls->hidden, key) < 0))
            rc = -1;
        Py_DECREF(key);
    }
    Py_XDECREF(it);
    if (rc < 0 || PyErr_Occurred())
        return -1;
    return PySet_Clear(ls->layer_hidden);
}

/* Open the directory FD again so reading it never moves the shared fd's offset. */
static int reopen_dir(int fd, int extra_flags)
{
    int dirfd = ovl_open_beneath(fd, ".", O_RDONLY | O_DIRECTORY | extra_flags);

    if (dirfd < 0 && errno == EPERM && extra_flags)
        dirfd = ovl_open_beneath(fd, ".", O_RDONLY | O_DIRECTORY); /* O_NOATIME: owner only */
    return dirfd;
}

/* One (fd, xwhiteouts, open_flags) item of merged_names' argument into LS. */
static int list_one_layer(struct listing *ls, PyObject *item, char *buf)
{
    PyObject *fd_obj, *xwh_obj;
    int fd, flags, xwh, dirfd, rc;

    if (!PyArg_ParseTuple(item, "OOi", &fd_obj, &xwh_obj, &flags))
        return -1;
    if (fd_from_object(fd_obj, &fd) < 0 || (xwh = PyObject_IsTrue(xwh_obj)) < 0)
        return -1;
    if (fd < 0)
        return 0;
    dirfd = reopen_dir(fd, flags);
    if (dirfd < 0)
        return OVL_DECLINE;
    rc = read_layer(ls, dirfd, xwh != 0, buf);
    close(dirfd);
    if (rc == 0)
        rc = merge_hidden(ls);
    return rc;
}

static PyObject *merged_names(PyObject *self, PyObject *arg)
{
    struct listing ls = {PyList_New(0), PySet_New(NULL), PySet_New(NULL), PySet_New(NULL)};
    PyObject *seq = PySequence_Fast(arg, "merged_names wants a sequence");
    PyObject *result = NULL;
    char *buf = PyMem_Malloc(DENTS_BUF_SIZE);
    Py_ssize_t i;
    int rc = 0;

    (void)self;
    if (!ls.names || !ls.seen || !ls.hidden || !ls.layer_hidden || !seq || !buf) {
        if (buf == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < PySequence_Fast_GET_SIZE(seq) && rc == 0; i++)
        rc = list_one_layer(&ls, PySequence_Fast_GET_ITEM(seq, i), buf);
    if (rc == OVL_DECLINE)
        result = Py_NewRef(Py_NotImplemented);
    else if (rc == 0)
        result = Py_NewRef(ls.names);
done:
    PyMem_Free(buf);
    Py_XDECREF(seq);
    Py_XDECREF(ls.names);
    Py_XDECREF(ls.seen);
    Py_XDECREF(ls.hidden);
    Py_XDECREF(ls.layer_hidden);
    return result;
}

static PyMethodDef methods[] = {
    {"whiteout_at", whiteout_at, METH_VARARGS, "Is NAME in DIRFD a char 0/0 whiteout?"},
    {"lookup", lookup, METH_VARARGS,
     "lookup(name, fds, xwhiteouts) -> None | NotImplemented | (is_dir, hits, markers, stat)"},
    {"lookup_child", lookup_child, METH_VARARGS,
     "lookup_child(parent, name, dirs, try_dir_fd, cache_size) -> Resolved | None | "
     "NotImplemented"},
    {"set_markers", set_markers, METH_O, "set_markers((none, opaque, xwhiteouts, both))"},
    {"merged_names", merged_names, METH_O,
     "merged_names(dirs) -> list[bytes] | NotImplemented; dirs: (fd, xwhiteouts, flags)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyoverlay._native", "Native lookup helpers for pyoverlay.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);

    if (m == NULL)
        return NULL;
    if (!(str_path = PyUnicode_InternFromString("path")) ||
        !(str_layers = PyUnicode_InternFromString("layers")) ||
        !(str_markers = PyUnicode_InternFromString("markers")) ||
        !(str_xattr_whiteouts = PyUnicode_InternFromString("xattr_whiteouts")) ||
        !(str_fd = PyUnicode_InternFromString("fd")) ||
        !(str_index = PyUnicode_InternFromString("index")) ||
        !(str_move_to_end = PyUnicode_InternFromString("move_to_end"))) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "OPAQUE", OVL_OPAQUE) < 0 ||
        PyModule_AddIntConstant(m, "XWHITEOUTS", OVL_XWHITEOUTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
