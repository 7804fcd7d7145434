/* writer.c -- the writer handle: a target file or block device with its size, zeroing policy
 * and preallocation.  Jobs embed one and let every worker write through its shared target;
 * the public cdm_writer_* functions expose the same writer to a caller that pushes bytes at
 * any offset and in any order (a stream decoder): each put is staged through an aligned
 * buffer (unless the caller's own is aligned as its offset is) so its aligned body goes out
 * with O_DIRECT and only the unaligned edges through the page cache, all-zero blocks become
 * zeroed ranges, and finish makes it durable.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BOUNCE_BYTES (1u << 20)     /* bytes staged per step of cdm_writer_put */
#define ULL(v) ((unsigned long long)(v))

static int check_opts(struct cdm_error *err, const struct cdm_writer_opts *o)
{
    uint32_t sparse = o->sparse_size ? o->sparse_size : CDM_DEFAULT_SPARSE;
    if (o->sector != 0 && ((o->sector & (o->sector - 1)) != 0 || o->sector < 512 ||
                           o->sector > 65536))
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL,
                             "sector size %u is not a power of two from 512 to 65536", o->sector);
    if (sparse < 512 || (sparse & (sparse - 1)) != 0 || sparse > CDM_MAX_REQUEST)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL,
                             "sparse size must be a power of two between 512 and 64 MiB");
    if (o->preallocation != CDM_PREALLOC_OFF && o->preallocation != CDM_PREALLOC_FALLOC &&
        o->preallocation != CDM_PREALLOC_FULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "unknown preallocation mode %d",
                             o->preallocation);
    return 0;
}

/* Set up W (caller-allocated) to write OPTS->size bytes to FD (DIRECT_FD: O_DIRECT twin or
 * -1), preparing the preallocation as a job needs it (a job visits every range).  Counters go
 * to W->io.stats.  0 or -errno (message in W->io.error). */
int cdm_writer_setup(struct cdm_writer *w, cdm_ctx *ctx, int fd, int direct_fd,
                     const struct cdm_writer_opts *opts)
{
    memset(w, 0, sizeof *w);
    w->ctx = ctx;
    w->size = opts->size;
    w->preallocation = opts->preallocation;
    w->flags = opts->flags;
    int rc = check_opts(&w->io.error, opts);
    if (rc < 0)
        return rc;
    rc = cdm_target_init(&w->t, fd, direct_fd, opts->is_blockdev != 0, opts->sector,
                         opts->sparse_size, (opts->flags & CDM_COPY_TARGET_IS_ZERO) != 0,
                         (opts->flags & CDM_COPY_NO_ZERO_DETECT) == 0, CDM_ZP_SPARSE);
    if (rc < 0)
        return cdm_error_set(&w->io.error, CDM_SIDE_TARGET, rc, "cannot set up the target: %s",
                             strerror(-rc));
    return cdm_prealloc_prepare(&w->t, opts->preallocation, opts->size, &w->io);
}

/* Finish W after work that ended with RC: count preallocated zero ranges, then sync (also
 * after a cancellation, so a re-run finds a consistent target) unless W's flags say not to.
 * W's counters are added to STATS (which also holds the job's worker counters; may be NULL).
 * Returns RC, or the sync's failure when RC was 0; the first
 * failure's message is in W->io.error. */
int cdm_writer_end(struct cdm_writer *w, int rc, struct cdm_copy_stats *stats)
{
    struct cdm_copy_stats local;
    if (stats == NULL) {
        memset(&local, 0, sizeof local);
        stats = &local;
    }
    cdm_stats_add(stats, &w->io.stats);
    memset(&w->io.stats, 0, sizeof w->io.stats);
    if (w->preallocation != CDM_PREALLOC_OFF)
        cdm_prealloc_account(stats);
    if ((rc == 0 || rc == -CDM_ECANCELED) && !(w->flags & CDM_COPY_NO_SYNC)) {
        struct cdm_error sync_err = {0};
        uint64_t t0 = cdm_now_ns();
        int src = cdm_target_sync(&w->t, &sync_err);
        stats->sync_ns += cdm_now_ns() - t0;
        if (rc == 0 && src < 0)
            rc = cdm_error_take(&w->io.error, &sync_err);
    }
    w->finished = true;
    return rc;
}

/* Release what cdm_writer_setup allocated in W. */
void cdm_writer_cleanup(struct cdm_writer *w)
{
    cdm_target_fini(&w->t);
    free(w->bounce);
    w->bounce = NULL;
}

/* The caller of a public writer call: clear CTX, refuse when W failed or finished. */
static int enter(cdm_writer *w)
{
    cdm_clear_error(w->ctx);
    if (w->io.error.rc < 0)
        return cdm_error_take(&w->ctx->error, &w->io.error);
    if (w->finished)
        return cdm_set_error(w->ctx, CDM_SIDE_NONE, -EINVAL, "the writer is finished");
    return 0;
}

/* The end of a public writer call that returned RC: W's first failure goes to its context. */
static int leave(cdm_writer *w, int rc)
{
    if (rc >= 0)
        return rc;
    cdm_error_take(&w->ctx->error, &w->io.error);
    return cdm_set_error(w->ctx, CDM_SIDE_TARGET, rc, "%s", strerror(-rc));
}

static int check_range(cdm_writer *w, const char *what, uint64_t off, uint64_t len)
{
    if (off > w->size || len > w->size - off)
        return cdm_error_set(&w->io.error, CDM_SIDE_TARGET, -EINVAL,
                             "%s of %llu bytes at offset %llu passes the end of the target "
                             "(%llu bytes)",
                             what, ULL(len), ULL(off), ULL(w->size));
    return 0;
}

/* A push writer never sees most of a preallocated target: reserve or provision all of it
 * now, as a job would while visiting every range. */
static int preallocate_all(cdm_writer *w, bool caller_zero)
{
    if (w->preallocation == CDM_PREALLOC_OFF || w->size == 0)
        return 0;
    bool fill = w->t.is_blockdev || w->t.policy == CDM_ZP_WRITE;
    if (fill) {
        w->t.known_zero = false;
        int rc = cdm_zero_range_io(&w->t, &w->io, 0, w->size);
        if (rc < 0)
            return rc;
    }
    /* Zeroing is skipped only on the caller's word: a put may overwrite earlier data. */
    w->t.known_zero = caller_zero;
    return 0;
}

/* Open a writer on FD (DIRECT_FD: its O_DIRECT twin or -1) by OPTS into *OUT, keeping CTX
 * for messages; preallocation is applied now, to the whole size.  0, -errno or -EINVAL;
 * message in CTX. */
int cdm_writer_open(cdm_ctx *ctx, int fd, int direct_fd, const struct cdm_writer_opts *opts,
                    cdm_writer **out)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    *out = NULL;
    cdm_writer *w = calloc(1, sizeof *w);
    if (w == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    int rc = cdm_writer_setup(w, ctx, fd, direct_fd, opts);
    if (rc == 0) {
        w->bounce = cdm_alloc_aligned(BOUNCE_BYTES + CDM_ALIGN);
        if (w->bounce == NULL)
            rc = cdm_error_set(&w->io.error, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    }
    if (rc == 0)
        rc = preallocate_all(w, (opts->flags & CDM_COPY_TARGET_IS_ZERO) != 0);
    if (rc < 0) {
        cdm_error_take(&ctx->error, &w->io.error);
        cdm_writer_cleanup(w);
        free(w);
        return rc;
    }
    *out = w;
    return 0;
}

/* Put [OFF, OFF+LEN) from STAGE, where STAGE[i] is aligned when OFF+i is: the unaligned head
 * and tail through the page cache, the aligned body with O_DIRECT. */
static int put_aligned(cdm_writer *w, const uint8_t *stage, uint64_t off, size_t len)
{
    uint64_t end = off + len;
    uint64_t a = CDM_MIN(CDM_ALIGN_UP(off, CDM_ALIGN), end);
    uint64_t b = CDM_MAX(a, CDM_ALIGN_DOWN(end, CDM_ALIGN));
    int rc = 0;
    if (a > off)
        rc = cdm_target_put(&w->t, &w->io, stage, off, (size_t)(a - off));
    if (rc == 0 && b > a)
        rc = cdm_target_put(&w->t, &w->io, stage + (a - off), a, (size_t)(b - a));
    if (rc == 0 && end > b)
        rc = cdm_target_put(&w->t, &w->io, stage + (b - off), b, (size_t)(end - b));
    return rc;
}

/* Put [OFF, OFF+LEN) (inside one bounce step) from SRC through the bounce buffer. */
static int put_step(cdm_writer *w, const uint8_t *src, uint64_t off, size_t len)
{
    uint8_t *stage = w->bounce + (off % CDM_ALIGN);  /* stage[i] is aligned when off+i is */
    memcpy(stage, src, len);
    return put_aligned(w, stage, off, len);
}

/* Write LEN bytes of BUF at OFFSET of W's target: in one request when BUF is aligned as
 * OFFSET is (a caller's aligned stage), else staged in steps of BOUNCE_BYTES.  0, -errno or
 * -EINVAL (range past the size); W's first failure is returned from then on. */
int cdm_writer_put(cdm_writer *w, const void *buf, size_t len, uint64_t offset)
{
    int rc = enter(w);
    if (rc == 0)
        rc = check_range(w, "write", offset, len);
    const uint8_t *p = buf;
    if (rc == 0 && (uintptr_t)p % CDM_ALIGN == offset % CDM_ALIGN)
        return leave(w, put_aligned(w, p, offset, len));
    while (rc == 0 && len > 0) {
        uint64_t step_end = CDM_ALIGN_DOWN(offset, BOUNCE_BYTES) + BOUNCE_BYTES;
        size_t n = (size_t)CDM_MIN((uint64_t)len, step_end - offset);
        rc = put_step(w, p, offset, n);
        p += n;
        offset += n;
        len -= n;
    }
    return leave(w, rc);
}

/* Make [OFFSET, OFFSET+LENGTH) of W's target read as zeros.  0, -errno or -EINVAL. */
int cdm_writer_zero(cdm_writer *w, uint64_t offset, uint64_t length)
{
    int rc = enter(w);
    if (rc == 0)
        rc = check_range(w, "zeroing", offset, length);
    if (rc == 0)
        rc = cdm_target_zero(&w->t, &w->io, offset, length);
    return leave(w, rc);
}

/* Complete W: fdatasync unless CDM_COPY_NO_SYNC, add its counters to STATS (may be NULL).
 * 0 or -errno (or W's first earlier failure). */
int cdm_writer_finish(cdm_writer *w, struct cdm_copy_stats *stats)
{
    int rc = enter(w);
    if (rc == 0)
        rc = cdm_writer_end(w, 0, stats);
    return leave(w, rc);
}

/* Sync what W wrote and mark it finished without success.  0 or -errno of the sync. */
int cdm_writer_abort(cdm_writer *w)
{
    cdm_clear_error(w->ctx);
    if (w->finished)
        return 0;
    w->finished = true;
    struct cdm_error err = {0};
    int rc = cdm_target_sync(&w->t, &err);
    if (rc < 0)
        return cdm_error_take(&w->ctx->error, &err);
    return 0;
}

/* Release W and its buffers (NULL is allowed); never syncs. */
void cdm_writer_free(cdm_writer *w)
{
    if (w == NULL)
        return;
    cdm_writer_cleanup(w);
    free(w);
}
