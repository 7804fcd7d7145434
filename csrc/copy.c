/* copy.c -- the RAW copy, a producer of the job driver: source extents (the file reader's
 * SEEK_DATA/SEEK_HOLE map of the source or of a loop device's backing file, or a full read)
 * become work items; workers read data items through the reader, and the writer detects
 * zeros and writes them; hole items are zeroed on the target unless it is known to read as
 * zeros.  Also the FICLONE reflink.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"
#include "stream.h"

struct copy_state {
    struct cdm_reader *src;
    struct cdm_hasher *hash;    /* ordered mode: the bytes are hashed in offset order */
    bool full_read;
    uint64_t size;
    uint32_t request;
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
    if (s->full_read) {
        item->kind = CDM_ITEM_DATA;
        item->offset = s->pos;
        item->length = CDM_MIN((uint64_t)s->request, s->size - s->pos);
        s->pos += item->length;
        return 1;
    }
    if (s->pos >= s->data_end) {
        uint64_t ds, de;
        int rc = s->src->ops->next_data(s->src, s->pos, s->size, &ds, &de);
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

static int copy_work(struct cdm_worker *w, const struct cdm_item *item)
{
    struct cdm_job *job = w->job;
    if (item->kind == CDM_ITEM_HOLE)
        return cdm_target_zero(job->target, &w->io, item->offset, item->length);
    /* The buffer holds a whole request, a multiple of CDM_ALIGN: O_DIRECT may round up. */
    int rc = cdm_read(job->src, w->buf, (size_t)item->length, item->offset, CDM_READ_ROOM,
                      &w->io);
    if (rc < 0)
        return rc;
    if (job->emit != NULL)
        return 0;           /* written by copy_emit, in order */
    return cdm_target_put(job->target, &w->io, w->buf, item->offset, (size_t)item->length);
}

/* Ordered mode: hash the item's bytes, then write them. */
static int copy_emit(struct cdm_worker *w, const struct cdm_item *item, uint8_t *buf)
{
    struct copy_state *s = w->job->state;
    if (item->kind == CDM_ITEM_HOLE)
        return 0;
    int rc = cdm_hasher_update(s->hash, buf, (size_t)item->length, &w->io.error);
    if (rc < 0)
        return rc;
    return cdm_target_put(w->job->target, &w->io, buf, item->offset, (size_t)item->length);
}

/* Open the file reader of SRC_FD for OPTS' scan method into FR.  0 or -errno/-EINVAL. */
static int open_source(cdm_ctx *ctx, struct cdm_file_reader *fr, int src_fd,
                       const struct cdm_copy_opts *opts)
{
    int map_fd = -1;
    uint64_t map_offset = 0;
    switch (opts->scan_method) {
    case CDM_SCAN_SEEK_HOLE:
        map_fd = opts->map_fd >= 0 ? opts->map_fd : src_fd;
        map_offset = opts->map_fd >= 0 ? opts->map_offset : 0;
        break;
    case CDM_SCAN_LOOP_BACKING:
        if (opts->map_fd < 0)
            return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EINVAL,
                                 "the loop-backing scan needs the backing file");
        map_fd = opts->map_fd;
        map_offset = opts->map_offset;
        break;
    case CDM_SCAN_FULL_READ:
        break;
    default:
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL, "unknown scan method %d",
                             opts->scan_method);
    }
    return cdm_file_reader_init(fr, src_fd, opts->src_direct_fd, map_fd, map_offset,
                                &ctx->error);
}

/* Copy OPTS->size bytes from SRC_FD to DST_FD (offset 0 of both) keeping the target sparse
 * and finishing with fdatasync.  OPTS selects the scan method and the O_DIRECT twins; STATS
 * (zeroed by the caller) receives counters.  0, -errno, or -CDM_ECANCELED; -EIO when the
 * source ended early or changed size during the copy.  The message and the endpoint
 * concerned are in CTX. */
int cdm_copy(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
             struct cdm_copy_stats *stats)
{
    uint32_t request, sparse;
    int rc = cdm_job_begin(ctx, opts, &request, &sparse);
    if (rc < 0)
        return rc;
    struct cdm_file_reader fr;
    rc = open_source(ctx, &fr, src_fd, opts);
    if (rc < 0)
        return rc;
    return cdm_copy_reader(ctx, &fr.r, dst_fd, opts, NULL, stats);
}

/* The RAW copy from any reader SRC (OPTS checked by cdm_job_begin): by its extent map unless
 * OPTS->scan_method is CDM_SCAN_FULL_READ or the reader has none.  With HASH (a full read in
 * ordered mode), every byte goes through HASH in offset order before it is written. */
int cdm_copy_reader(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                    const struct cdm_copy_opts *opts, struct cdm_hasher *hash,
                    struct cdm_copy_stats *stats)
{
    struct copy_state s;
    memset(&s, 0, sizeof s);
    s.src = src;
    s.hash = hash;
    s.full_read = opts->scan_method == CDM_SCAN_FULL_READ || src->ops->next_data == NULL ||
                  hash != NULL;
    s.size = opts->size;
    s.request = opts->request_size ? opts->request_size : CDM_DEFAULT_REQUEST;
    struct cdm_producer p = {
        .state = &s,
        .next = copy_next,
        .work = copy_work,
        .buf_size = s.request,
        .scan_method = s.full_read ? CDM_SCAN_FULL_READ : opts->scan_method,
        .emit = hash != NULL ? copy_emit : NULL,
    };
    return cdm_job_drive(ctx, src, dst_fd, opts, &p, stats);
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
