/* copy.c -- the RAW copy: source extents (SEEK_DATA/SEEK_HOLE on the source or on a loop
 * device's backing file, or a full read) become work items; workers read data items
 * (O_DIRECT when possible), detect zeros and write through the target writer; hole items
 * are zeroed on the target unless it is known to read as zeros.  Also the FICLONE reflink.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

struct copy_state {
    int src_fd;
    int src_dfd;
    int map_fd;
    uint64_t map_offset;
    int scan;
    uint64_t size;
    uint32_t request;
    struct cdm_target *target;
    /* cursor, guarded by the job lock */
    uint64_t pos;
    uint64_t data_start;    /* current data extent, aligned to CDM_ALIGN and clipped */
    uint64_t data_end;
};

static int copy_next(struct cdm_job *job, struct cdm_item *item)
{
    struct copy_state *s = job->state;
    if (s->pos >= s->size)
        return 0;
    memset(item, 0, sizeof *item);
    if (s->scan == CDM_SCAN_FULL_READ) {
        item->kind = CDM_ITEM_DATA;
        item->offset = s->pos;
        item->length = CDM_MIN((uint64_t)s->request, s->size - s->pos);
        s->pos += item->length;
        return 1;
    }
    if (s->pos >= s->data_end) {
        uint64_t ds, de;
        int rc = cdm_next_data(s->map_fd, s->map_offset, s->pos, s->size, &ds, &de);
        if (rc < 0)
            return cdm_job_fail(job, CDM_SIDE_SOURCE, rc,
                                "extent scan (SEEK_DATA) at offset %llu: %s",
                                (unsigned long long)s->pos, strerror(-rc));
        s->data_start = CDM_MAX(s->pos, CDM_ALIGN_DOWN(ds, CDM_ALIGN));
        s->data_end = CDM_MIN(s->size, CDM_ALIGN_UP(de, CDM_ALIGN));
        if (ds >= s->size)
            s->data_start = s->data_end = s->size;
    }
    if (s->pos < s->data_start) {
        item->kind = CDM_ITEM_HOLE;
        item->offset = s->pos;
        item->length = CDM_MIN(s->data_start - s->pos, (uint64_t)CDM_HOLE_CHUNK);
    } else {
        item->kind = CDM_ITEM_DATA;
        item->offset = s->pos;
        item->length = CDM_MIN((uint64_t)s->request, s->data_end - s->pos);
    }
    s->pos += item->length;
    return 1;
}

/* Read LEN bytes at OFF of the source into BUF. */
static int read_source(struct copy_state *s, struct cdm_worker *w, uint8_t *buf, uint64_t off,
                       size_t len)
{
    size_t got = 0;
    int rc;
    if (s->src_dfd >= 0 && CDM_IS_ALIGNED(off, CDM_ALIGN)) {
        size_t want = (size_t)CDM_ALIGN_UP(len, CDM_ALIGN);
        rc = cdm_pread_full(s->src_dfd, buf, want, off, &got);
        if (rc == 0 || (rc == -EINVAL && CDM_IS_ALIGNED(got, CDM_ALIGN))) {
            if (got > 0)
                w->stats.direct_read = 1;
            if (got >= len) {
                w->stats.bytes_read += len;
                return 0;
            }
            if (rc == 0)
                goto short_read;
            /* EINVAL mid-way (unaligned end of file): finish with buffered reads. */
        } else if (rc != -EINVAL) {
            goto fail;
        }
        if (!CDM_IS_ALIGNED(got, CDM_ALIGN))
            got = 0;
    }
    {
        size_t more = 0;
        rc = cdm_pread_full(s->src_fd, buf + got, len - got, off + got, &more);
        if (rc < 0)
            goto fail;
        posix_fadvise(s->src_fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
        got += more;
        if (got < len)
            goto short_read;
    }
    w->stats.bytes_read += len;
    return 0;
short_read:
    return cdm_worker_fail(w, CDM_SIDE_SOURCE, -EIO,
                           "source ended at offset %llu, expected %llu bytes "
                           "(did it shrink during the copy?)",
                           (unsigned long long)(off + got), (unsigned long long)s->size);
fail:
    return cdm_worker_fail(w, CDM_SIDE_SOURCE, rc, "read of %zu bytes at offset %llu: %s", len,
                           (unsigned long long)off, strerror(-rc));
}

static int copy_work(struct cdm_worker *w, const struct cdm_item *item)
{
    struct copy_state *s = w->job->state;
    if (item->kind == CDM_ITEM_HOLE)
        return cdm_target_zero(s->target, w, item->offset, item->length);
    int rc = read_source(s, w, w->buf, item->offset, (size_t)item->length);
    if (rc < 0)
        return rc;
    return cdm_target_put(s->target, w, w->buf, item->offset, (size_t)item->length);
}

/* Check OPTS and fill in defaults: request size, sparse size, threads. */
int cdm_check_copy_opts(cdm_ctx *ctx, const struct cdm_copy_opts *opts, uint32_t *request,
                        uint32_t *sparse)
{
    *request = opts->request_size ? opts->request_size : CDM_DEFAULT_REQUEST;
    *sparse = opts->sparse_size ? opts->sparse_size : CDM_DEFAULT_SPARSE;
    if (*request < CDM_ALIGN || *request > CDM_MAX_REQUEST || !CDM_IS_ALIGNED(*request, CDM_ALIGN))
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "request size must be a multiple of 4096 between 4 KiB and 64 MiB");
    if (*sparse < 512 || (*sparse & (*sparse - 1)) != 0 || *sparse > *request)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "sparse size must be a power of two between 512 and the request "
                             "size");
    if (opts->threads > CDM_MAX_THREADS)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL, "at most %u threads",
                             CDM_MAX_THREADS);
    return 0;
}

/* Copy OPTS->size bytes from SRC_FD to DST_FD (offset 0 of both) keeping the target sparse
 * and finishing with fdatasync.  OPTS selects the scan method and the O_DIRECT twins; STATS
 * (zeroed by the caller) receives counters.  0, -errno, or -CDM_ECANCELED; the message and
 * the endpoint concerned are in CTX. */
int cdm_copy(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
             struct cdm_copy_stats *stats)
{
    uint32_t request, sparse;
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    int rc = cdm_check_copy_opts(ctx, opts, &request, &sparse);
    if (rc < 0)
        return rc;

    struct copy_state s;
    memset(&s, 0, sizeof s);
    s.src_fd = src_fd;
    s.src_dfd = opts->src_direct_fd;
    s.size = opts->size;
    s.request = request;
    s.scan = opts->scan_method;
    switch (s.scan) {
    case CDM_SCAN_SEEK_HOLE:
        s.map_fd = opts->map_fd >= 0 ? opts->map_fd : src_fd;
        s.map_offset = opts->map_fd >= 0 ? opts->map_offset : 0;
        break;
    case CDM_SCAN_LOOP_BACKING:
        if (opts->map_fd < 0)
            return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EINVAL,
                                 "the loop-backing scan needs the backing file");
        s.map_fd = opts->map_fd;
        s.map_offset = opts->map_offset;
        break;
    case CDM_SCAN_FULL_READ:
        break;
    default:
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL, "unknown scan method %d", s.scan);
    }

    struct cdm_target t;
    rc = cdm_target_init(&t, dst_fd, opts->dst_direct_fd, opts->target_is_blockdev != 0,
                         opts->target_sector, sparse,
                         (opts->flags & CDM_COPY_TARGET_IS_ZERO) != 0,
                         (opts->flags & CDM_COPY_NO_ZERO_DETECT) == 0, CDM_ZP_SPARSE);
    if (rc < 0)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "cannot set up the target: %s",
                             strerror(-rc));
    s.target = &t;
    if (opts->preallocation != CDM_PREALLOC_OFF) {
        char why[CDM_ERRMSG_MAX] = "";
        rc = cdm_prealloc_prepare(&t, opts->preallocation, s.size, stats, why, sizeof why);
        if (rc < 0) {
            cdm_target_fini(&t);
            return cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "%s", why);
        }
    }

    struct cdm_job job;
    memset(&job, 0, sizeof job);
    job.ctx = ctx;
    job.state = &s;
    job.next = copy_next;
    job.work = copy_work;
    job.buf_size = request;
    job.nthreads = opts->threads;
    job.total = s.size;

    stats->scan_method = s.scan;
    rc = cdm_job_run(&job, stats);
    if (opts->preallocation != CDM_PREALLOC_OFF)
        cdm_prealloc_account(stats);
    rc = cdm_finish_target(ctx, &t, opts, rc);
    cdm_target_fini(&t);
    return rc;
}

/* After a job that ended with RC: sync T (also when cancelled, so a re-run finds a
 * consistent target) unless OPTS says not to.  Returns RC, or the sync's error when RC was 0;
 * a cancellation keeps its own message. */
int cdm_finish_target(cdm_ctx *ctx, struct cdm_target *t, const struct cdm_copy_opts *opts,
                      int rc)
{
    if ((rc != 0 && rc != -CDM_ECANCELED) || (opts->flags & CDM_COPY_NO_SYNC))
        return rc;
    char saved[CDM_ERRMSG_MAX];
    memcpy(saved, ctx->errmsg, sizeof saved);
    int side = ctx->errside;
    int src = cdm_target_sync(t, ctx);
    if (rc == 0)
        return src;
    memcpy(ctx->errmsg, saved, sizeof saved);
    ctx->errside = side;
    return rc;
}

/* Make DST_FD share all of SRC_FD's extents (FICLONE), then fdatasync it.  0 or -errno:
 * -EOPNOTSUPP, -EXDEV, -EINVAL or -ENOTTY when reflinks cannot be used here. */
int cdm_reflink(cdm_ctx *ctx, int src_fd, int dst_fd)
{
    cdm_clear_error(ctx);
    if (ioctl(dst_fd, FICLONE, src_fd) < 0)
        return cdm_set_error(ctx, CDM_SIDE_TARGET, -errno, "FICLONE: %s", strerror(errno));
    while (fdatasync(dst_fd) < 0) {
        if (errno != EINTR)
            return cdm_set_error(ctx, CDM_SIDE_TARGET, -errno, "fdatasync: %s", strerror(errno));
    }
    return 0;
}
