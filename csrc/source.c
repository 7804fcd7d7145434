/* source.c -- the public face of sources that are not local files (http.c): inspection,
 * reads, and the copy, conversion and stream jobs, each bound to the calling context for
 * cancellation and progress.
 */
#include <errno.h>
#include <string.h>

#include "internal.h"
#include "qcow2.h"
#include "stream.h"

void cdm_source_free(cdm_source *src)
{
    if (src != NULL)
        src->ops->destroy(src);
}

int cdm_source_info(const cdm_source *src, struct cdm_source_info *out)
{
    src->ops->info(src, out);
    return 0;
}

/* SRC's reader for an operation on CTX, or NULL with -ESPIPE in CTX. */
static struct cdm_reader *reader_of(cdm_ctx *ctx, cdm_source *src)
{
    struct cdm_reader *r = src->ops->reader(src, true);
    if (r == NULL)
        cdm_set_error(ctx, CDM_SIDE_SOURCE, -ESPIPE,
                      "the source cannot be read at random (no byte ranges, or no size)");
    return r;
}

/* Start a job over SRC's random-access reader (*R): OPTS checked as every job's.  0 or an
 * error with the message in CTX. */
static int begin_job(cdm_ctx *ctx, cdm_source *src, const struct cdm_copy_opts *opts,
                     struct cdm_reader **r)
{
    uint32_t request, sparse;
    int rc = cdm_job_begin(ctx, opts, &request, &sparse);
    if (rc < 0)
        return rc;
    *r = reader_of(ctx, src);
    return *r != NULL ? 0 : -ESPIPE;
}

int cdm_source_pread(cdm_ctx *ctx, cdm_source *src, void *buf, size_t len, uint64_t off)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    struct cdm_io io;
    memset(&io, 0, sizeof io);
    /* the first bytes are there even without ranges */
    struct cdm_reader *r = src->ops->reader(src, false);
    src->ops->bind(src, ctx);
    int rc = cdm_read(r, buf, len, off, CDM_READ_CACHED, &io);
    src->ops->bind(src, NULL);
    if (rc < 0)
        cdm_error_take(&ctx->error, &io.error);
    return rc;
}

int cdm_source_copy(cdm_ctx *ctx, cdm_source *src, int dst_fd, const struct cdm_copy_opts *opts,
                    int hash, struct cdm_copy_stats *stats, struct cdm_stream_result *res)
{
    struct cdm_reader *r;
    int rc = begin_job(ctx, src, opts, &r);
    if (rc < 0)
        return rc;
    struct cdm_hasher hasher;
    rc = cdm_hasher_init(&hasher, hash, &ctx->error);
    if (rc < 0)
        return rc;
    struct cdm_copy_opts o = *opts;
    o.scan_method = CDM_SCAN_FULL_READ;
    src->ops->bind(src, ctx);
    rc = cdm_copy_reader(ctx, r, dst_fd, &o, hash != CDM_HASH_NONE ? &hasher : NULL, stats);
    src->ops->bind(src, NULL);
    if (res != NULL) {
        memset(res, 0, sizeof *res);
        res->bytes_in = res->bytes_out = res->image_size = opts->size;
        res->format = CDM_FORMAT_RAW;
        res->compression = CDM_COMPRESSION_NONE;
    }
    if (rc == 0 && res != NULL)
        rc = cdm_hasher_final(&hasher, res->digest, &res->digest_len, &ctx->error);
    cdm_hasher_fini(&hasher);
    return rc;
}

int cdm_source_qcow2_inspect(cdm_ctx *ctx, cdm_source *src, struct cdm_qcow2_info *out)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    struct cdm_reader *r = reader_of(ctx, src);
    if (r == NULL)
        return -ESPIPE;
    src->ops->bind(src, ctx);
    int rc = cdm_qcow2_inspect_reader(ctx, r, out);
    src->ops->bind(src, NULL);
    return rc;
}

int cdm_source_qcow2_convert(cdm_ctx *ctx, cdm_source *src, int dst_fd,
                             const struct cdm_copy_opts *opts, struct cdm_copy_stats *stats)
{
    struct cdm_reader *r;
    int rc = begin_job(ctx, src, opts, &r);
    if (rc < 0)
        return rc;
    src->ops->bind(src, ctx);
    rc = cdm_qcow2_convert_reader(ctx, r, dst_fd, opts, stats);
    src->ops->bind(src, NULL);
    return rc;
}

int cdm_source_stream(cdm_ctx *ctx, cdm_source *src, cdm_writer *w,
                      const struct cdm_stream_opts *opts, struct cdm_stream_result *res)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    memset(res, 0, sizeof *res);
    src->ops->bind(src, ctx);
    int rc = src->ops->stream(src, ctx, w, opts, res);
    src->ops->bind(src, NULL);
    return rc;
}
