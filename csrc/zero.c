/* zero.c -- zero detection and the zeroing-method cascade.
 *
 * A range is zeroed with the cheapest method that works on the target: punch a hole
 * (deallocates; on a block device only when the device guarantees zeros), zero-range,
 * BLKZEROOUT (block devices), and finally writing zeros.  On block devices the operations
 * are aligned to the logical sector size and the unaligned edges are written.  A method that
 * reports "unsupported" is skipped for the next CDM_REPROBE_AFTER operations and then tried
 * again, so one failure never degrades a whole run.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

/* 1 if the LEN bytes at BUF are all zero, else 0.  The first 16 bytes are checked by hand,
 * then the buffer is compared with itself shifted by 16 bytes: glibc's vectorised memcmp
 * does the rest at memory bandwidth. */
int cdm_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i] != 0)
            return 0;
    if (len <= 16)
        return 1;
    return memcmp(p, p + 16, len - 16) == 0;
}

static int write_zeros(struct cdm_target *t, uint64_t off, uint64_t len)
{
    while (len > 0) {
        size_t n = (size_t)CDM_MIN(len, (uint64_t)CDM_ZERO_BUF);
        int fd = t->fd;
        if (t->dfd >= 0 && CDM_IS_ALIGNED(off, CDM_ALIGN) && CDM_IS_ALIGNED(n, CDM_ALIGN))
            fd = t->dfd;
        int rc = cdm_pwrite_full(fd, t->zeros, n, off);
        if (rc < 0)
            return rc;
        off += n;
        len -= n;
    }
    return 0;
}

static int try_method(struct cdm_target *t, int method, uint64_t off, uint64_t len)
{
    int r;
    switch (method) {
    case CDM_ZERO_PUNCH_HOLE:
        r = fallocate(t->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
        break;
    case CDM_ZERO_ZERO_RANGE:
        r = fallocate(t->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
        break;
    case CDM_ZERO_BLKZEROOUT: {
        if (!t->is_blockdev)
            return -ENOTTY;
        uint64_t range[2] = {off, len};
        r = ioctl(t->fd, BLKZEROOUT, range);
        break;
    }
    default:
        return write_zeros(t, off, len);
    }
    return r < 0 ? -errno : 0;
}

static const int policy_methods[3][5] = {
    [CDM_ZP_SPARSE] = {CDM_ZERO_PUNCH_HOLE, CDM_ZERO_ZERO_RANGE, CDM_ZERO_BLKZEROOUT,
                       CDM_ZERO_WRITE, -1},
    [CDM_ZP_PROVISION] = {CDM_ZERO_ZERO_RANGE, CDM_ZERO_BLKZEROOUT, CDM_ZERO_WRITE, -1, -1},
    [CDM_ZP_WRITE] = {CDM_ZERO_WRITE, -1, -1, -1, -1},
};

/* Whether a zeroing method's failure RC means "try the next method".  ENOTTY, EOPNOTSUPP
 * and friends: the method does not exist here, and it is skipped for a while.  EINVAL from
 * fallocate or BLKZEROOUT: this range was refused (an alignment or size the filesystem or
 * device does not take), so the next method handles this range only and the method stays in
 * use.  Anything else is an error. */
static bool method_refused(int rc, bool *remember)
{
    *remember = cdm_errno_unsupported(-rc);
    return *remember || rc == -EINVAL;
}

/* Take method M of T unless it is being skipped (counting the skip down). */
static bool method_usable(struct cdm_target *t, int m)
{
    if (m == CDM_ZERO_WRITE)
        return true;
    pthread_mutex_lock(&t->lock);
    bool skip = t->skip[m] > 0;
    if (skip)
        t->skip[m]--;
    pthread_mutex_unlock(&t->lock);
    return !skip;
}

/* Zero [OFF, OFF+LEN) with the best method of T's policy; the caller handles alignment. */
static int zero_aligned(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    const int *methods = policy_methods[t->policy >= 0 && t->policy <= CDM_ZP_WRITE ? t->policy : 0];
    struct cdm_copy_stats *st = &io->stats;
    for (int i = 0; i < 5 && methods[i] >= 0; i++) {
        int m = methods[i];
        if (!method_usable(t, m))
            continue;
        int rc = try_method(t, m, off, len);
        st->zero_calls++;
        if (rc == 0) {
            st->zero_methods |= 1u << m;
            st->bytes_zeroed += len;
            return 0;
        }
        bool remember = false;
        if (m == CDM_ZERO_WRITE || !method_refused(rc, &remember))
            return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                                 "zeroing %llu bytes at offset %llu: %s",
                                 (unsigned long long)len, (unsigned long long)off, strerror(-rc));
        if (remember) {
            pthread_mutex_lock(&t->lock);
            t->skip[m] = CDM_REPROBE_AFTER;
            pthread_mutex_unlock(&t->lock);
        }
        st->zero_fallbacks++;
    }
    return -EIO; /* not reached: CDM_ZERO_WRITE either succeeds or returns */
}

/* Write zeros over the unaligned edge [OFF, OFF+LEN) of a device range. */
static int zero_edge(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    int rc = write_zeros(t, off, len);
    if (rc < 0)
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc, "writing zeros at offset %llu: %s",
                             (unsigned long long)off, strerror(-rc));
    io->stats.bytes_zeroed += len;
    io->stats.zero_methods |= 1u << CDM_ZERO_WRITE;
    return 0;
}

/* Zero [OFF, OFF+LEN) of T by its policy, splitting off the edges that are not sector-aligned
 * on a block device (they are written).  0 or -errno (message and counters in IO). */
static int zero_range_untimed(struct cdm_target *t, struct cdm_io *io, uint64_t off,
                              uint64_t len)
{
    uint64_t end = off + len;
    while (off < end) {
        uint64_t piece_end = CDM_MIN(end, off + CDM_HOLE_CHUNK);
        uint64_t a = off, b = piece_end;
        if (t->is_blockdev) {
            a = CDM_ALIGN_UP(off, t->sector);
            b = CDM_ALIGN_DOWN(piece_end, t->sector);
            if (a >= b)
                a = b = piece_end;
        }
        int rc = zero_edge(t, io, off, a - off);
        if (rc == 0 && b > a)
            rc = zero_aligned(t, io, a, b - a);
        if (rc == 0)
            rc = zero_edge(t, io, b, piece_end - b);
        if (rc < 0)
            return rc;
        off = piece_end;
    }
    return 0;
}

/* zero_range_untimed, its time counted in IO (every zeroing of a target goes through here). */
int cdm_zero_range_io(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    uint64_t t0 = cdm_now_ns();
    int rc = zero_range_untimed(t, io, off, len);
    io->stats.write_ns += cdm_now_ns() - t0;
    return rc;
}

/* Make [OFF, OFF+LEN) of T read as zeros; nothing when T is known to be zero.  0 or -errno
 * (message and counters in IO). */
int cdm_target_zero(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    if (t->known_zero) {
        io->stats.bytes_skipped += len;
        return 0;
    }
    return cdm_zero_range_io(t, io, off, len);
}

/* Zero [OFFSET, OFFSET+LENGTH) of FD with the best working method, as a copy would.
 * IS_BLOCKDEV and SECTOR describe FD.  Methods used are added to STATS (may be NULL).
 * 0 or -errno. */
int cdm_zero_range(cdm_ctx *ctx, int fd, int is_blockdev, uint32_t sector, uint64_t offset,
                   uint64_t length, struct cdm_copy_stats *stats)
{
    struct cdm_target t;
    struct cdm_io io;
    memset(&io, 0, sizeof io);
    cdm_clear_error(ctx);
    if (offset + length < offset)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, -EINVAL, "range overflows");
    int rc = cdm_target_init(&t, fd, -1, is_blockdev != 0, sector, CDM_DEFAULT_SPARSE, false,
                             true, CDM_ZP_SPARSE);
    if (rc < 0)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "cannot set up the target");
    rc = cdm_zero_range_io(&t, &io, offset, length);
    cdm_target_fini(&t);
    if (stats != NULL)
        cdm_stats_add(stats, &io.stats);
    if (rc < 0)
        return cdm_set_error(ctx, io.error.side, rc, "%s", io.error.msg);
    return 0;
}
