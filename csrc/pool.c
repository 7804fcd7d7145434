/* pool.c -- the worker pool under every copy.  A job hands out items (guest ranges) under a
 * lock; each worker reads, detects zeros and writes its item with positional I/O, so items
 * complete in any order and reading overlaps writing across workers.  Memory is bounded by
 * nthreads x (buf_size + scratch_size).  The thread that called cdm_job_run reports progress
 * and polls for cancellation.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define PROGRESS_HEARTBEAT_NS 500000000ll   /* report at least twice a second */

void cdm_stats_add(struct cdm_copy_stats *into, const struct cdm_copy_stats *from)
{
    into->bytes_read += from->bytes_read;
    into->bytes_written += from->bytes_written;
    into->bytes_zeroed += from->bytes_zeroed;
    into->bytes_skipped += from->bytes_skipped;
    into->bytes_zero_data += from->bytes_zero_data;
    into->zero_calls += from->zero_calls;
    into->zero_methods |= from->zero_methods;
    into->zero_fallbacks += from->zero_fallbacks;
    into->alloc_methods |= from->alloc_methods;
    into->bytes_allocated += from->bytes_allocated;
    into->direct_read |= from->direct_read;
    into->direct_write |= from->direct_write;
}

/* Record a worker failure: message into W, returns RC. */
int cdm_worker_fail(struct cdm_worker *w, int side, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    cdm_vformat_error(w->errmsg, sizeof w->errmsg, fmt, ap);
    va_end(ap);
    w->errside = side;
    return rc;
}

/* Record a failure of the item producer (called with the job lock held); returns RC. */
int cdm_job_fail(struct cdm_job *job, int side, int rc, const char *fmt, ...)
{
    va_list ap;
    if (job->err == 0) {
        va_start(ap, fmt);
        cdm_vformat_error(job->errmsg, sizeof job->errmsg, fmt, ap);
        va_end(ap);
        job->errside = side;
        job->err = rc;
    }
    job->stop = true;
    return rc;
}

static void *worker_main(void *arg)
{
    struct cdm_worker *w = arg;
    struct cdm_job *job = w->job;
    struct cdm_item item;

    for (;;) {
        pthread_mutex_lock(&job->lock);
        int rc = 0;
        if (!job->stop && !atomic_load(&job->ctx->cancel))
            rc = job->next(job, &item);
        if (rc <= 0) {
            if (rc < 0)
                job->stop = true;
            job->running--;
            pthread_cond_broadcast(&job->cond);
            pthread_mutex_unlock(&job->lock);
            return NULL;
        }
        pthread_mutex_unlock(&job->lock);

        rc = job->work(w, &item);

        pthread_mutex_lock(&job->lock);
        if (rc < 0) {
            if (job->err == 0) {
                job->err = rc;
                job->errside = w->errside;
                memcpy(job->errmsg, w->errmsg, sizeof job->errmsg);
            }
            job->stop = true;
        } else {
            job->done += item.length;
            job->completed++;
        }
        pthread_cond_broadcast(&job->cond);
        pthread_mutex_unlock(&job->lock);
    }
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* Run JOB (see internal.h).  0, -errno or -CDM_E*; the message goes to JOB->ctx. */
int cdm_job_run(struct cdm_job *job, struct cdm_copy_stats *stats)
{
    cdm_ctx *ctx = job->ctx;
    unsigned n = job->nthreads ? job->nthreads : CDM_DEFAULT_THREADS;
    if (n > CDM_MAX_THREADS)
        n = CDM_MAX_THREADS;

    struct cdm_worker *workers = calloc(n, sizeof *workers);
    pthread_t *tids = calloc(n, sizeof *tids);
    if (workers == NULL || tids == NULL) {
        free(workers);
        free(tids);
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "cannot allocate workers");
    }
    int rc = 0;
    for (unsigned i = 0; i < n; i++) {
        workers[i].job = job;
        workers[i].buf = cdm_alloc_aligned(job->buf_size);
        if (job->scratch_size)
            workers[i].scratch = cdm_alloc_aligned(job->scratch_size);
        if (workers[i].buf == NULL || (job->scratch_size && workers[i].scratch == NULL))
            rc = -ENOMEM;
    }
    if (rc < 0) {
        for (unsigned i = 0; i < n; i++) {
            free(workers[i].buf);
            free(workers[i].scratch);
        }
        free(workers);
        free(tids);
        return cdm_set_error(ctx, CDM_SIDE_NONE, rc, "cannot allocate I/O buffers");
    }

    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->cond, NULL);
    job->done = 0;
    job->completed = 0;
    job->err = 0;
    job->errside = CDM_SIDE_NONE;
    job->stop = false;
    job->errmsg[0] = '\0';

    unsigned started = 0;
    pthread_mutex_lock(&job->lock);
    for (unsigned i = 0; i < n; i++) {
        if (pthread_create(&tids[i], NULL, worker_main, &workers[i]) != 0)
            break;
        started++;
        job->running++;
    }
    if (started == 0) {
        job->err = -EAGAIN;
        snprintf(job->errmsg, sizeof job->errmsg, "cannot start worker threads");
    }

    bool cancelled = false;
    int64_t last_report = now_ns();
    while (job->running > 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_nsec += 100000000l;
        if (deadline.tv_nsec >= 1000000000l) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000l;
        }
        pthread_cond_timedwait(&job->cond, &job->lock, &deadline);

        if (atomic_load(&ctx->cancel) && !cancelled) {
            cancelled = true;
            job->stop = true;
        }
        int64_t t = now_ns();
        if (ctx->progress != NULL && !job->stop &&
            (job->completed > 0 || t - last_report >= PROGRESS_HEARTBEAT_NS)) {
            uint64_t done = job->done;
            job->completed = 0;
            last_report = t;
            pthread_mutex_unlock(&job->lock);
            int stop = ctx->progress(ctx->progress_opaque, done, job->total);
            pthread_mutex_lock(&job->lock);
            if (stop) {
                cancelled = true;
                job->stop = true;
            }
        }
    }
    pthread_mutex_unlock(&job->lock);

    for (unsigned i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    for (unsigned i = 0; i < n; i++) {
        cdm_stats_add(stats, &workers[i].stats);
        free(workers[i].buf);
        free(workers[i].scratch);
    }
    free(workers);
    free(tids);
    pthread_cond_destroy(&job->cond);
    pthread_mutex_destroy(&job->lock);

    if (job->err < 0)
        rc = cdm_set_error(ctx, job->errside, job->err, "%s", job->errmsg);
    else if (cancelled || atomic_load(&ctx->cancel))
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    else if (ctx->progress != NULL && ctx->progress(ctx->progress_opaque, job->total, job->total))
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    return rc;
}
