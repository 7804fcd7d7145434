/* reader_file.c -- the reader of a regular file or block device: positional reads through an
 * O_DIRECT twin where offset and buffer are aligned, the rest through the buffered fd with
 * the pages dropped afterwards (or kept, for small reads that neighbours share), and the
 * extent map from SEEK_DATA/SEEK_HOLE on the source itself or on another file that mirrors it
 * at an offset (a loop device's backing file).
 *
 * One rule for everything that goes wrong: a read that reaches the end of the source early
 * is -EIO ("source ended at offset N ... (did it shrink during the copy?)"); EINVAL from the
 * O_DIRECT twin means the filesystem refuses that alignment, and the rest of the read goes
 * through the buffered fd; every other error, EINVAL from the buffered fd included, is an
 * error.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define ULL(v) ((unsigned long long)(v))

/* The size of the regular file or block device FD into *SIZE.  0, -errno, or -EINVAL for
 * other kinds of files. */
int cdm_fd_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode)) {
        *size = (uint64_t)st.st_size;
        return 0;
    }
    if (S_ISBLK(st.st_mode)) {
        uint64_t n = 0;
        if (ioctl(fd, BLKGETSIZE64, &n) < 0)
            return -errno;
        *size = n;
        return 0;
    }
    return -EINVAL;
}

static int short_read(struct cdm_io *io, uint64_t at, size_t len, uint64_t off)
{
    return cdm_error_set(&io->error, CDM_SIDE_SOURCE, -EIO,
                         "source ended at offset %llu while reading %zu bytes at offset %llu "
                         "(did it shrink during the copy?)",
                         ULL(at), len, ULL(off));
}

static int read_failed(struct cdm_io *io, int rc, size_t len, uint64_t off)
{
    return cdm_error_set(&io->error, CDM_SIDE_SOURCE, rc, "read of %zu bytes at offset %llu: %s",
                         len, ULL(off), strerror(-rc));
}

/* The O_DIRECT part of a read: the aligned body of [OFF, OFF+LEN) (or all of it rounded up
 * when the buffer has room).  *GOT receives the bytes that arrived; 0 or -errno (EINVAL is
 * left to the caller, which reads the rest buffered). */
static int read_direct(struct cdm_file_reader *fr, uint8_t *buf, size_t len, uint64_t off,
                       unsigned flags, size_t *got)
{
    *got = 0;
    if (fr->dfd < 0 || (flags & CDM_READ_CACHED) || !CDM_IS_ALIGNED(off, CDM_ALIGN) ||
        !CDM_IS_ALIGNED((uintptr_t)buf, CDM_ALIGN))
        return 0;
    size_t body = (flags & CDM_READ_ROOM) ? (size_t)CDM_ALIGN_UP(len, CDM_ALIGN)
                                          : (size_t)CDM_ALIGN_DOWN(len, CDM_ALIGN);
    if (body == 0)
        return 0;
    int rc = cdm_pread_full(fr->dfd, buf, body, off, got);
    if (rc == -EINVAL)
        *got = (size_t)CDM_ALIGN_DOWN(*got, CDM_ALIGN);   /* alignment refused: go buffered */
    return rc;
}

static int file_read(struct cdm_reader *r, void *dst, size_t len, uint64_t off, unsigned flags,
                     struct cdm_io *io)
{
    struct cdm_file_reader *fr = (struct cdm_file_reader *)r;
    uint8_t *buf = dst;
    size_t got = 0;
    int rc = read_direct(fr, buf, len, off, flags, &got);
    if (rc < 0 && rc != -EINVAL)
        return read_failed(io, rc, len, off);
    if (got > 0)
        io->stats.direct_read = 1;
    if (got < len && rc == 0 && got > 0 && !CDM_IS_ALIGNED(got, CDM_ALIGN))
        return short_read(io, off + got, len, off);     /* O_DIRECT met the end */
    if (got < len) {
        size_t more = 0;
        rc = cdm_pread_full(fr->fd, buf + got, len - got, off + got, &more);
        if (rc < 0)
            return read_failed(io, rc, len, off);
        if (!(flags & CDM_READ_CACHED))
            posix_fadvise(fr->fd, (off_t)(off + got), (off_t)(len - got), POSIX_FADV_DONTNEED);
        got += more;
        if (got < len)
            return short_read(io, off + got, len, off);
    }
    io->stats.bytes_read += len;
    return 0;
}

static int file_next_data(struct cdm_reader *r, uint64_t pos, uint64_t end, uint64_t *ds,
                          uint64_t *de)
{
    struct cdm_file_reader *fr = (struct cdm_file_reader *)r;
    if (fr->map_fd < 0) {
        *ds = pos;
        *de = end;
        return 0;
    }
    return cdm_next_data(fr->map_fd, fr->map_offset, pos, end, ds, de);
}

static int file_get_size(struct cdm_reader *r, uint64_t *size)
{
    return cdm_fd_size(((struct cdm_file_reader *)r)->fd, size);
}

static const struct cdm_reader_ops file_ops = {
    .name = "file",
    .read = file_read,
    .next_data = file_next_data,
    .get_size = file_get_size,
    .close = NULL,
};

/* Set up FR to read the regular file or block device FD (DFD: its O_DIRECT twin or -1).
 * MAP_FD (or -1: no map, everything is data) answers SEEK_DATA for the source, source offset
 * 0 being MAP_FD offset MAP_OFFSET.  The descriptors stay the caller's.  0 or -errno
 * (message in ERR). */
int cdm_file_reader_init(struct cdm_file_reader *fr, int fd, int dfd, int map_fd,
                         uint64_t map_offset, struct cdm_error *err)
{
    memset(fr, 0, sizeof *fr);
    int rc = cdm_fd_size(fd, &fr->r.size);
    if (rc == -EINVAL)
        return cdm_error_set(err, CDM_SIDE_SOURCE, rc,
                             "the source is not a regular file or a block device");
    if (rc < 0)
        return cdm_error_set(err, CDM_SIDE_SOURCE, rc, "size of the source: %s", strerror(-rc));
    fr->r.ops = &file_ops;
    fr->r.align = 1;
    fr->r.pref_size = dfd >= 0 ? CDM_ALIGN : 0;
    fr->fd = fd;
    fr->dfd = dfd;
    fr->map_fd = map_fd;
    fr->map_offset = map_offset;
    return 0;
}
