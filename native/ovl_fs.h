/*
 * ovl_fs.h: the on-disk overlay rules in plain C, no Python.
 *
 * Everything here works on directory fds and single path components: objects are
 * looked at with fstatat(AT_SYMLINK_NOFOLLOW) and opened with openat2(RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the kernel has it, or openat(O_NOFOLLOW)
 * where it does not, so nothing a layer contains can lead outside that layer.
 *
 * Functions answer OVL_YES / OVL_NO, or OVL_DECLINE when something unusual happened (an
 * error the Python reference would raise, a redirect): the caller then lets the Python
 * reference (pyoverlay/namei.py, pyoverlay/readdir.py) handle the whole request, so
 * both paths always give the same answer, including the same exception.
 */
#ifndef PYOVERLAY_OVL_FS_H
#define PYOVERLAY_OVL_FS_H

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

enum { OVL_NO = 0, OVL_YES = 1, OVL_DECLINE = 2 };

/* Marker bits of one directory copy; the same meaning as layers.DirMarkers. */
enum { OVL_OPAQUE = 1, OVL_XWHITEOUTS = 2 };

#define OVL_WHITEOUT_PREFIX ".wh."
#define OVL_WHITEOUT_PREFIX_LEN 4
#define OVL_OPAQUE_FILE ".wh..wh..opq"

static const char *const ovl_opaque_xattrs[] = {
    "trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque",
};
static const char *const ovl_redirect_xattrs[] = {
    "trusted.overlay.redirect", "user.overlay.redirect",
};
static const char *const ovl_whiteout_xattrs[] = {
    "trusted.overlay.whiteout", "user.overlay.whiteout",
};
#define OVL_COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* "Not a directory inside this layer": the errors layers.NOT_A_DIR names. */
static inline bool ovl_not_a_dir(int err)
{
    return err == ENOENT || err == ENOTDIR || err == ELOOP;
}

/* xattr errors the Python reference (layers._getxattr) treats as "not there". */
static inline bool ovl_xattr_absent(int err)
{
    return err == ENODATA || err == ENOTSUP || err == EPERM || err == EACCES;
}

/* A single path component we can hand to the kernel: no '/', no NUL, not "." or "..". */
static inline bool ovl_plain_name(const char *name, size_t len)
{
    if (len == 0 || len > 255 || memchr(name, '/', len) || memchr(name, '\0', len))
        return false;
    return !(name[0] == '.' && (len == 1 || (len == 2 && name[1] == '.')));
}

static inline bool ovl_is_whiteout_st(const struct stat *st)
{
    return S_ISCHR(st->st_mode) && st->st_rdev == makedev(0, 0);
}

static inline bool ovl_is_whiteout_name(const char *name, size_t len)
{
    return len >= OVL_WHITEOUT_PREFIX_LEN &&
           memcmp(name, OVL_WHITEOUT_PREFIX, OVL_WHITEOUT_PREFIX_LEN) == 0;
}

/* Does NAME exist in DIRFD (any type, never followed)? Any error is "no", as in Python. */
static inline bool ovl_exists(int dirfd, const char *name)
{
    struct stat st;
    return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

/* Is there a ".wh.NAME" file next to NAME? */
static inline bool ovl_has_whiteout_file(int dirfd, const char *name, size_t len)
{
    char buf[OVL_WHITEOUT_PREFIX_LEN + 256];

    if (len > 255)
        return false; /* ".wh." + a 255-byte name is too long to exist */
    memcpy(buf, OVL_WHITEOUT_PREFIX, OVL_WHITEOUT_PREFIX_LEN);
    memcpy(buf + OVL_WHITEOUT_PREFIX_LEN, name, len);
    buf[OVL_WHITEOUT_PREFIX_LEN + len] = '\0';
    return ovl_exists(dirfd, buf);
}

/* 0: not probed yet, 1: the kernel has openat2, -1: it does not. */
static int ovl_have_openat2;

/*
 * Open the single component NAME below DIRFD without following any symlink: openat2
 * confines the walk to DIRFD (RESOLVE_BENEATH) and refuses every symlink and magic link;
 * where openat2 is missing, O_NOFOLLOW on a name without '/' does the same job.
 */
static inline int ovl_open_beneath(int dirfd, const char *name, int flags)
{
    flags |= O_NOFOLLOW | O_CLOEXEC;
    if (ovl_have_openat2 >= 0) {
        struct open_how how = {
            .flags = (unsigned long long)flags,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        long fd = syscall(SYS_openat2, dirfd, name, &how, sizeof(how));
        if (fd >= 0 || (errno != ENOSYS && errno != E2BIG)) {
            ovl_have_openat2 = 1;
            return (int)fd;
        }
        ovl_have_openat2 = -1;
    }
    return openat(dirfd, name, flags);
}

/*
 * Is NAME (already fstat'ed as ST) a zero-size file carrying overlay.whiteout? Only asked
 * in directories marked opaque="x". OVL_DECLINE on an xattr error Python would raise.
 */
static inline int ovl_is_xattr_whiteout(int dirfd, const char *name, const struct stat *st)
{
    int fd, answer = OVL_NO;
    size_t i;

    if (!S_ISREG(st->st_mode) || st->st_size != 0)
        return OVL_NO;
    fd = ovl_open_beneath(dirfd, name, O_RDONLY | O_NONBLOCK);
    if (fd < 0)
        return OVL_NO; /* the reference treats any open error as "not a whiteout" */
    for (i = 0; i < OVL_COUNT(ovl_whiteout_xattrs); i++) {
        if (fgetxattr(fd, ovl_whiteout_xattrs[i], NULL, 0) >= 0) {
            answer = OVL_YES;
            break;
        }
        if (!ovl_xattr_absent(errno)) {
            answer = OVL_DECLINE;
            break;
        }
    }
    close(fd);
    return answer;
}

/*
 * Read the xattr NAME of FD when its value is a single byte (*BYTE, OVL_YES). OVL_NO when
 * it is absent or of another length: no marker value is longer than "y".
 */
static inline int ovl_xattr_byte(int fd, const char *name, char *byte)
{
    char value[4];
    ssize_t n = fgetxattr(fd, name, value, sizeof(value));

    if (n < 0)
        return (ovl_xattr_absent(errno) || errno == ERANGE) ? OVL_NO : OVL_DECLINE;
    if (n != 1)
        return OVL_NO;
    *byte = value[0];
    return OVL_YES;
}

static inline bool ovl_in_list(const char *name, const char *const *list, size_t count)
{
    size_t i;

    for (i = 0; i < count; i++)
        if (strcmp(name, list[i]) == 0)
            return true;
    return false;
}

/*
 * The names of FD's xattrs into *BUF (malloc'ed when the stack buffer STACK is too
 * small; the caller frees *BUF when it differs from STACK). Returns the length or -1.
 */
static inline ssize_t ovl_list_xattrs(int fd, char *stack, size_t stack_size, char **buf)
{
    ssize_t n;

    *buf = stack;
    n = flistxattr(fd, stack, stack_size);
    while (n < 0 && errno == ERANGE) {
        ssize_t want = flistxattr(fd, NULL, 0);
        if (want < 0)
            return -1;
        if (*buf != stack)
            free(*buf);
        *buf = malloc((size_t)want + 1);
        if (*buf == NULL) {
            *buf = stack;
            errno = ENOMEM;
            return -1;
        }
        n = flistxattr(fd, *buf, (size_t)want + 1);
    }
    return n;
}

/*
 * The markers (OVL_OPAQUE | OVL_XWHITEOUTS) of the directory open as FD, as
 * layers.read_dir_markers reads them. OVL_DECLINE if it carries a redirect (Python
 * follows those) or on an error Python would raise.
 */
static inline int ovl_dir_markers(int fd, int *markers)
{
    char stack[1024], *names, *p;
    ssize_t n = ovl_list_xattrs(fd, stack, sizeof(stack), &names);
    int bits = 0, answer = OVL_YES, r;
    char value = 0;

    if (n < 0)
        return errno == ENOMEM ? -1 : OVL_DECLINE;
    for (p = names; p < names + n; p += strlen(p) + 1) {
        if (ovl_in_list(p, ovl_redirect_xattrs, OVL_COUNT(ovl_redirect_xattrs))) {
            answer = OVL_DECLINE;
            break;
        }
        if (!ovl_in_list(p, ovl_opaque_xattrs, OVL_COUNT(ovl_opaque_xattrs)))
            continue;
        r = ovl_xattr_byte(fd, p, &value);
        if (r == OVL_DECLINE) {
            answer = OVL_DECLINE;
            break;
        }
        if (r == OVL_NO)
            continue;
        if (value == 'y')
            bits |= OVL_OPAQUE;
        /* "x" means xattr whiteouts only in the overlay namespaces, never fuse-overlayfs' */
        else if (value == 'x' && strncmp(p, "user.fuseoverlayfs.", 19) != 0)
            bits |= OVL_XWHITEOUTS;
    }
    if (names != stack)
        free(names);
    if (answer == OVL_YES && !(bits & OVL_OPAQUE) && ovl_exists(fd, OVL_OPAQUE_FILE))
        bits |= OVL_OPAQUE;
    *markers = bits;
    return answer;
}

/*
 * Markers of the child directory NAME of DIRFD (0 if it is not a directory we can reach
 * without a symlink, as namei._child_markers). -1 with errno set on ENOMEM.
 */
static inline int ovl_child_markers(int dirfd, const char *name, int *markers)
{
    int fd = ovl_open_beneath(dirfd, name, O_RDONLY | O_DIRECTORY);
    int answer;

    *markers = 0;
    if (fd < 0)
        return ovl_not_a_dir(errno) ? OVL_YES : OVL_DECLINE;
    answer = ovl_dir_markers(fd, markers);
    close(fd);
    return answer;
}

/* One layer that holds the name being looked up. */
struct ovl_hit {
    int index;   /* index into the candidate list */
    int markers; /* OVL_OPAQUE | OVL_XWHITEOUTS for a directory */
};

struct ovl_lookup {
    int nhits;
    bool is_dir;
    struct stat st;       /* of the topmost hit */
    struct ovl_hit *hits; /* room for one per candidate, given by the caller */
    /*
     * Markers of the child directory NAME of candidate I (parent fd DIRFD): OVL_YES with
     * *MARKERS set, OVL_DECLINE, or -1 on a (Python) error. NULL: ovl_child_markers.
     */
    int (*child_markers)(void *ctx, int i, int dirfd, const char *name, int *markers);
    void *ctx;
};

/*
 * namei.lookup_child for a name without redirects, over N candidate parent directories
 * (FDS[i] < 0: the parent is missing in that layer; XWH[i]: that parent holds xattr
 * whiteouts). Returns OVL_YES (found, OUT filled), OVL_NO (nothing visible),
 * OVL_DECLINE (let Python answer), or -1 (errno or a Python error set by the callback).
 */
static int ovl_lookup_child(const int *fds, const unsigned char *xwh, int n, const char *name,
                            size_t len, struct ovl_lookup *out)
{
    struct stat st;
    int i, r, markers;

    out->nhits = 0;
    out->is_dir = false;
    for (i = 0; i < n; i++) {
        int fd = fds[i];
        if (fd < 0)
            continue;
        if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (!ovl_not_a_dir(errno))
                return OVL_DECLINE; /* Python raises this one */
            if (ovl_has_whiteout_file(fd, name, len))
                break;
            continue;
        }
        if (ovl_is_whiteout_st(&st))
            break;
        if (xwh[i]) {
            r = ovl_is_xattr_whiteout(fd, name, &st);
            if (r != OVL_NO) {
                if (r == OVL_DECLINE)
                    return OVL_DECLINE;
                break;
            }
        }
        if (!S_ISDIR(st.st_mode)) {
            if (out->nhits == 0) {
                out->hits[0].index = i;
                out->hits[0].markers = 0;
                out->nhits = 1;
                out->st = st;
                return OVL_YES;
            }
            break; /* a non-directory below a directory ends the merge */
        }
        if (out->child_markers)
            r = out->child_markers(out->ctx, i, fd, name, &markers);
        else
            r = ovl_child_markers(fd, name, &markers);
        if (r != OVL_YES)
            return r;
        if (out->nhits == 0) {
            out->st = st;
            out->is_dir = true;
        }
        out->hits[out->nhits].index = i;
        out->hits[out->nhits].markers = markers;
        out->nhits++;
        if ((markers & OVL_OPAQUE) || ovl_has_whiteout_file(fd, name, len))
            break;
    }
    return out->nhits ? OVL_YES : OVL_NO;
}

/* Is the directory entry NAME (d_type DTYPE) in DIRFD a whiteout of any on-disk kind
 * but ".wh.NAME"? As readdir._entry_is_whiteout: a vanished entry counts as hidden. */
static int ovl_entry_is_whiteout(int dirfd, const char *name, unsigned char dtype, bool xwh)
{
    struct stat st;

    if (dtype == DT_DIR || dtype == DT_LNK || (dtype == DT_REG && !xwh))
        return OVL_NO;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? OVL_YES : OVL_DECLINE;
    if (S_ISDIR(st.st_mode) || S_ISLNK(st.st_mode))
        return OVL_NO;
    if (S_ISREG(st.st_mode))
        return xwh ? ovl_is_xattr_whiteout(dirfd, name, &st) : OVL_NO;
    return ovl_is_whiteout_st(&st) ? OVL_YES : OVL_NO;
}

#endif /* PYOVERLAY_OVL_FS_H */
