/* job.c -- the one job driver under every producer (RAW copy, QCOW2 conversion, and whatever
 * reads through a struct cdm_reader next).  A producer supplies only its "next item" and "do
 * item" functions and its buffer sizes; the driver checks the options, opens the writer with
 * its preallocation, runs the worker pool, accounts the preallocation, checks that the source
 * kept its size, and makes the target durable.
 */
#include <errno.h>
#include <string.h>

#include "internal.h"

#define ULL(v) ((unsigned long long)(v))

/* Start an operation on CTX: clear its error and cancellation flag, check OPTS and fill in
 * the defaults of *REQUEST and *SPARSE.  0 or -EINVAL (message in CTX). */
int cdm_job_begin(cdm_ctx *ctx, const struct cdm_copy_opts *opts, uint32_t *request,
                  uint32_t *sparse)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
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

/* After a clean job: the source must still have the size it had when the job started (a
 * file truncated mid-copy reads as a trailing hole).  0 or -EIO (message in CTX). */
static int check_source_size(cdm_ctx *ctx, struct cdm_reader *src)
{
    uint64_t now = 0;
    if (src->ops->get_size == NULL)
        return 0;
    int rc = src->ops->get_size(src, &now);
    if (rc < 0)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, rc, "size of the source after the copy: %s",
                             strerror(-rc));
    if (now != src->size)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EIO,
                             "the source changed size during the copy (%llu bytes at the start, "
                             "%llu at the end)",
                             ULL(src->size), ULL(now));
    return 0;
}

/* Run producer P from SRC onto DST_FD by OPTS (checked by cdm_job_begin) and add the
 * counters to STATS (scan_method from P).  0, -errno, -CDM_E* or -CDM_ECANCELED; the message
 * and the endpoint concerned are in CTX. */
int cdm_job_drive(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                  const struct cdm_copy_opts *opts, const struct cdm_producer *p,
                  struct cdm_copy_stats *stats)
{
    struct cdm_writer_opts wo = {
        .size = opts->size,
        .sector = opts->target_sector,
        .sparse_size = opts->sparse_size,
        .flags = opts->flags,
        .is_blockdev = opts->target_is_blockdev,
        .preallocation = opts->preallocation,
    };
    struct cdm_writer w;
    int rc = cdm_writer_setup(&w, ctx, dst_fd, opts->dst_direct_fd, &wo);
    if (rc < 0) {
        cdm_error_take(&ctx->error, &w.io.error);
        cdm_writer_cleanup(&w);
        return rc;
    }

    struct cdm_job job;
    memset(&job, 0, sizeof job);
    job.ctx = ctx;
    job.state = p->state;
    job.next = p->next;
    job.work = p->work;
    job.emit = p->emit;
    job.window = p->window;
    job.buf_size = p->buf_size;
    job.scratch_size = p->scratch_size;
    job.nthreads = opts->threads;
    job.total = opts->size;
    job.src = src;
    job.target = &w.t;

    stats->scan_method = p->scan_method;
    rc = cdm_job_run(&job, stats);
    if (rc == 0)
        rc = check_source_size(ctx, src);
    rc = cdm_writer_end(&w, rc, stats);
    if (rc < 0)
        cdm_error_take(&ctx->error, &w.io.error);
    cdm_writer_cleanup(&w);
    return rc;
}
