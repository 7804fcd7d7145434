/* prealloc.c -- preallocation: every block of a target reserved (falloc) or physically
 * written (full), so the VM never pays allocation cost or meets ENOSPC later.
 *
 * Files: falloc is fallocate mode 0 (unwritten extents that read as zeros).  Full tries
 * FALLOC_FL_WRITE_ZEROES (Linux 6.17+: written, zeroed extents, the zeroing offloaded to the
 * device), else reserves with fallocate and writes the zeros.  Block devices: zero-range
 * (REQ_OP_WRITE_ZEROES without unmap, which provisions thin devices), then BLKZEROOUT, then
 * writing zeros with O_DIRECT.  A mode that cannot be honoured is an error, never a silent
 * downgrade.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#ifndef FALLOC_FL_WRITE_ZEROES
#define FALLOC_FL_WRITE_ZEROES 0x80
#endif

static int do_fallocate(int fd, int mode, uint64_t off, uint64_t len)
{
    while (fallocate(fd, mode, (off_t)off, (off_t)len) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

static uint32_t alloc_bits_from_zero(uint32_t zero_methods)
{
    uint32_t bits = 0;
    if (zero_methods & (1u << CDM_ZERO_ZERO_RANGE))
        bits |= 1u << CDM_ALLOC_ZERO_RANGE;
    if (zero_methods & (1u << CDM_ZERO_BLKZEROOUT))
        bits |= 1u << CDM_ALLOC_BLKZEROOUT;
    if (zero_methods & (1u << CDM_ZERO_WRITE))
        bits |= 1u << CDM_ALLOC_WRITE;
    return bits;
}

/* Reserve [OFF, OFF+LEN) of a file with fallocate mode 0.  0 or -errno (message in IO). */
static int file_falloc(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    int rc = do_fallocate(t->fd, 0, off, len);
    if (rc < 0 && cdm_errno_unsupported(-rc))
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                             "preallocation=falloc: this filesystem cannot reserve space "
                             "(fallocate: %s); use preallocation=full",
                             strerror(-rc));
    if (rc < 0)
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                             "preallocation=falloc of %llu bytes: %s", (unsigned long long)len,
                             strerror(-rc));
    io->stats.alloc_methods |= 1u << CDM_ALLOC_FALLOCATE;
    io->stats.bytes_allocated += len;
    return 0;
}

/* Try FALLOC_FL_WRITE_ZEROES; 1 if it did the job, 0 if unsupported (a kernel or filesystem
 * without it answers EOPNOTSUPP), <0 on error (message in IO). */
static int file_write_zeroes(struct cdm_target *t, struct cdm_io *io, uint64_t off,
                             uint64_t len)
{
    int rc = do_fallocate(t->fd, FALLOC_FL_WRITE_ZEROES, off, len);
    if (rc == 0) {
        io->stats.alloc_methods |= 1u << CDM_ALLOC_WRITE_ZEROES;
        io->stats.bytes_allocated += len;
        return 1;
    }
    if (cdm_errno_unsupported(-rc))
        return 0;
    return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc, "preallocation=full of %llu bytes: %s",
                         (unsigned long long)len, strerror(-rc));
}

/* Reserve [OFF, OFF+LEN) of a file before zeros are written into it, so that ENOSPC comes
 * now; a filesystem that cannot reserve (EOPNOTSUPP) just gets the zeros.  0 or -errno. */
static int file_reserve(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    int rc = do_fallocate(t->fd, 0, off, len);
    if (rc < 0 && !cdm_errno_unsupported(-rc))
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                             "preallocation=full of %llu bytes: %s", (unsigned long long)len,
                             strerror(-rc));
    return 0;
}

/* After a preallocating job, count the ranges it zeroed as allocated in ST. */
void cdm_prealloc_account(struct cdm_copy_stats *st)
{
    st->alloc_methods |= alloc_bits_from_zero(st->zero_methods);
    st->bytes_allocated += st->bytes_zeroed;
}

/* Set up T for writing SIZE bytes with preallocation MODE: files are reserved (falloc) or
 * written (full) up front; devices provision their zero ranges instead of punching them.
 * 0 or -errno (message and counters in IO). */
int cdm_prealloc_prepare(struct cdm_target *t, int mode, uint64_t size, struct cdm_io *io)
{
    if (mode == CDM_PREALLOC_OFF)
        return 0;
    if (mode != CDM_PREALLOC_FALLOC && mode != CDM_PREALLOC_FULL)
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, -EINVAL,
                             "unknown preallocation mode %d", mode);
    if (t->is_blockdev) {
        /* Zero ranges are provisioned instead of punched; a "known zero" thin device still
         * needs its blocks provisioned. */
        t->known_zero = false;
        t->policy = CDM_ZP_PROVISION;
        return 0;
    }
    if (size == 0)
        return 0;
    if (mode == CDM_PREALLOC_FALLOC) {
        t->policy = CDM_ZP_PROVISION;
        return file_falloc(t, io, 0, size);
    }
    int rc = file_write_zeroes(t, io, 0, size);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        t->known_zero = true;       /* every block written and reading as zeros */
        t->policy = CDM_ZP_PROVISION;
        return 0;
    }
    rc = file_reserve(t, io, 0, size);
    if (rc < 0)
        return rc;
    t->known_zero = false;
    t->policy = CDM_ZP_WRITE;
    return 0;
}

/* Preallocate [OFF, OFF+LEN) of the file or device of T by MODE.  0 or -errno (IO). */
static int preallocate_range(struct cdm_target *t, struct cdm_io *io, int mode, uint64_t off,
                             uint64_t len)
{
    if (t->is_blockdev) {
        int rc = cdm_zero_range_io(t, io, off, len);
        io->stats.alloc_methods |= alloc_bits_from_zero(io->stats.zero_methods);
        if (rc == 0)
            io->stats.bytes_allocated += len;
        return rc;
    }
    if (mode == CDM_PREALLOC_FALLOC)
        return file_falloc(t, io, off, len);
    int rc = file_write_zeroes(t, io, off, len);
    if (rc != 0)
        return rc < 0 ? rc : 0;
    rc = file_reserve(t, io, off, len);
    if (rc < 0)
        return rc;
    t->policy = CDM_ZP_WRITE;
    rc = cdm_zero_range_io(t, io, off, len);
    if (rc == 0) {
        io->stats.alloc_methods |= 1u << CDM_ALLOC_WRITE;
        io->stats.bytes_allocated += len;
    }
    return rc;
}

/* Preallocate [OFFSET, OFFSET+LENGTH) of FD by MODE (CDM_PREALLOC_*).  FD is a regular file
 * or, with IS_BLOCKDEV, a block device of logical sector size SECTOR; DIRECT_FD is its
 * O_DIRECT twin or -1.  Methods used go to STATS (may be NULL).  Ends with fdatasync.
 * 0, -errno (e.g. -ENOSPC, -EOPNOTSUPP when falloc cannot be honoured); message in CTX. */
int cdm_preallocate(cdm_ctx *ctx, int fd, int direct_fd, int is_blockdev, uint32_t sector,
                    uint64_t offset, uint64_t length, int mode, struct cdm_copy_stats *stats)
{
    struct cdm_io io;
    struct cdm_target t;

    cdm_clear_error(ctx);
    memset(&io, 0, sizeof io);
    if (offset + length < offset)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, -EINVAL, "range overflows");
    if (mode == CDM_PREALLOC_OFF || length == 0)
        return 0;
    if (mode != CDM_PREALLOC_FALLOC && mode != CDM_PREALLOC_FULL)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, -EINVAL, "unknown preallocation mode %d",
                             mode);
    int rc = cdm_target_init(&t, fd, direct_fd, is_blockdev != 0, sector, CDM_DEFAULT_SPARSE,
                             false, false, CDM_ZP_PROVISION);
    if (rc < 0)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "cannot set up the target");
    rc = preallocate_range(&t, &io, mode, offset, length);
    if (rc == 0)
        rc = cdm_target_sync(&t, &io.error);
    cdm_target_fini(&t);
    if (stats != NULL)
        cdm_stats_add(stats, &io.stats);
    if (rc < 0)
        return cdm_set_error(ctx, io.error.side, rc, "%s", io.error.msg);
    return 0;
}
