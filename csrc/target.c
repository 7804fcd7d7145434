/* target.c -- the target writer: data goes out with positional writes (O_DIRECT when the
 * request is aligned and the caller supplied a direct fd), all-zero blocks found in the data
 * become zeroed ranges (holes on a fresh file), and buffered writes are flushed and dropped
 * from the page cache per request so memory stays bounded.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Set up T for writing to FD (and its O_DIRECT twin DFD, or -1).  0 or -ENOMEM/-EINVAL. */
int cdm_target_init(struct cdm_target *t, int fd, int dfd, bool is_blockdev, uint32_t sector,
                    uint32_t sparse_size, bool known_zero, bool detect_zeros, int policy)
{
    memset(t, 0, sizeof *t);
    if (sector == 0)
        sector = 512;
    if ((sector & (sector - 1)) != 0 || sector > 65536)
        return -EINVAL;
    t->fd = fd;
    t->dfd = dfd;
    t->is_blockdev = is_blockdev;
    t->sector = sector;
    t->sparse_size = sparse_size ? sparse_size : CDM_DEFAULT_SPARSE;
    t->known_zero = known_zero;
    t->detect_zeros = detect_zeros;
    t->policy = policy;
    t->zeros = cdm_alloc_aligned(CDM_ZERO_BUF);
    if (t->zeros == NULL)
        return -ENOMEM;
    memset(t->zeros, 0, CDM_ZERO_BUF);
    pthread_mutex_init(&t->lock, NULL);
    return 0;
}

/* Release what cdm_target_init allocated in T (safe to call twice). */
void cdm_target_fini(struct cdm_target *t)
{
    if (t->zeros != NULL) {
        pthread_mutex_destroy(&t->lock);
        free(t->zeros);
        t->zeros = NULL;
    }
}

/* Push buffered pages of [OFF, OFF+LEN) to the device and drop them from the cache (the time
 * counted in IO). */
static void flush_range(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len)
{
    uint64_t t0 = cdm_now_ns();
    uint64_t a = CDM_ALIGN_DOWN(off, CDM_ALIGN);
    uint64_t b = CDM_ALIGN_UP(off + len, CDM_ALIGN);
    sync_file_range(t->fd, (off_t)a, (off_t)(b - a),
                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                        SYNC_FILE_RANGE_WAIT_AFTER);
    posix_fadvise(t->fd, (off_t)a, (off_t)(b - a), POSIX_FADV_DONTNEED);
    io->stats.write_ns += cdm_now_ns() - t0;
}

static int write_data_untimed(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf,
                              uint64_t off, size_t len, bool *buffered)
{
    if (t->dfd >= 0 && CDM_IS_ALIGNED(off, CDM_ALIGN) && CDM_IS_ALIGNED(len, CDM_ALIGN) &&
        CDM_IS_ALIGNED((uintptr_t)buf, CDM_ALIGN)) {
        int rc = cdm_pwrite_full(t->dfd, buf, len, off);
        if (rc == 0) {
            io->stats.direct_write = 1;
            io->stats.bytes_written += len;
            return 0;
        }
        if (rc != -EINVAL)
            return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                                 "write of %zu bytes at offset %llu: %s", len,
                                 (unsigned long long)off, strerror(-rc));
        /* EINVAL: this filesystem refuses this O_DIRECT request; write it buffered. */
    }
    int rc = cdm_pwrite_full(t->fd, buf, len, off);
    if (rc < 0)
        return cdm_error_set(&io->error, CDM_SIDE_TARGET, rc,
                             "write of %zu bytes at offset %llu: %s", len,
                             (unsigned long long)off, strerror(-rc));
    io->stats.bytes_written += len;
    *buffered = true;
    return 0;
}

/* Write LEN bytes of BUF at OFF (O_DIRECT when possible; *BUFFERED set otherwise), the time
 * spent counted in IO.  0 or -errno. */
static int write_data(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf,
                      uint64_t off, size_t len, bool *buffered)
{
    uint64_t t0 = cdm_now_ns();
    int rc = write_data_untimed(t, io, buf, off, len, buffered);
    io->stats.write_ns += cdm_now_ns() - t0;
    return rc;
}

/* Write LEN bytes of BUF at OFF as data (O_DIRECT when OFF, LEN and BUF are aligned and T has
 * a direct fd).  0 or -errno (message and counters in IO). */
int cdm_target_write(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf,
                     uint64_t off, size_t len)
{
    bool buffered = false;
    int rc = write_data(t, io, buf, off, len, &buffered);
    if (rc == 0 && buffered)
        flush_range(t, io, off, len);
    return rc;
}

/* Write LEN bytes of BUF at OFF, turning runs of all-zero SPARSE_SIZE blocks (aligned to
 * the target offset) into zeroed ranges.  0 or -errno (message and counters in IO). */
int cdm_target_put(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf,
                   uint64_t off, size_t len)
{
    if (!t->detect_zeros)
        return cdm_target_write(t, io, buf, off, len);

    bool buffered = false;
    uint64_t end = off + len;
    uint64_t run_start = off;
    int run_zero = -1;
    uint64_t pos = off;
    int rc = 0;

    while (pos < end) {
        uint64_t block_end = CDM_MIN(end, CDM_ALIGN_DOWN(pos, t->sparse_size) + t->sparse_size);
        int z = cdm_is_zero(buf + (pos - off), (size_t)(block_end - pos));
        if (run_zero >= 0 && z != run_zero) {
            if (run_zero) {
                io->stats.bytes_zero_data += pos - run_start;
                rc = cdm_target_zero(t, io, run_start, pos - run_start);
            } else {
                rc = write_data(t, io, buf + (run_start - off), run_start,
                                (size_t)(pos - run_start), &buffered);
            }
            if (rc < 0)
                return rc;
            run_start = pos;
        }
        run_zero = z;
        pos = block_end;
    }
    if (run_zero == 1) {
        io->stats.bytes_zero_data += end - run_start;
        rc = cdm_target_zero(t, io, run_start, end - run_start);
    } else if (run_zero == 0) {
        rc = write_data(t, io, buf + (run_start - off), run_start, (size_t)(end - run_start),
                        &buffered);
    }
    if (rc == 0 && buffered)
        flush_range(t, io, off, len);
    return rc;
}

/* Make T durable.  0 or -errno (message in ERR). */
int cdm_target_sync(struct cdm_target *t, struct cdm_error *err)
{
    while (fdatasync(t->fd) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == EINVAL || errno == EROFS)
            return 0; /* special files that cannot be synced */
        int rc = -errno;
        return cdm_error_set(err, CDM_SIDE_TARGET, rc, "fdatasync: %s", strerror(-rc));
    }
    return 0;
}
