/* pool.c -- the worker pool under every job.  A job hands out items (guest ranges) under a
 * lock; each worker reads, detects zeros and writes its item with positional I/O, so items
 * complete in any order and reading overlaps writing across workers.  Memory is bounded by
 * nthreads x (buf_size + scratch_size).  The thread that called cdm_job_run reports progress
 * and polls for cancellation.
 *
 * Ordered mode (JOB->emit set), for a sequential stream: items are still processed in any
 * order, each into its own slot buffer, but handed to emit() in offset order, by one thread at
 * a time.  At most JOB->window items are in flight (produced and not yet emitted), so memory
 * is bounded by window x buf_size.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* Ordered mode: one item in flight. */
struct cdm_slot {
    struct cdm_item item;
    uint8_t *buf;
    bool done;
};

#define PROGRESS_HEARTBEAT_NS 500000000ll   /* report at least twice a second */

/* Add the counters of FROM to INTO (method bits are or-ed). */
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
    into->read_ns += from->read_ns;
    into->write_ns += from->write_ns;
    into->sync_ns += from->sync_ns;
}

/* Record a failure of the item producer (called with the job lock held) and stop the job.
 * Returns the job's first failure code. */
int cdm_job_fail(struct cdm_job *job, int side, int rc, const char *fmt, ...)
{
    if (job->error.rc == 0 && rc < 0) {
        va_list ap;
        va_start(ap, fmt);
        cdm_vformat_error(job->error.msg, sizeof job->error.msg, fmt, ap);
        va_end(ap);
        job->error.side = side;
        job->error.rc = rc;
    }
    job->stop = true;
    return job->error.rc != 0 ? job->error.rc : rc;
}

/* A worker's item failed: its first error becomes the job's (unless one is there). */
static void worker_failed(struct cdm_job *job, struct cdm_worker *w, int rc)
{
    if (w->io.error.rc == 0)
        cdm_error_set(&w->io.error, CDM_SIDE_NONE, rc, "%s", strerror(-rc));
    cdm_error_take(&job->error, &w->io.error);
    job->stop = true;
}

/* Ordered mode, lock held: emit the finished items at the head of the window in order,
 * unless another worker is doing so. */
static void drain(struct cdm_job *job, struct cdm_worker *w)
{
    while (!job->emitting && !job->stop && job->seq_emit < job->seq_next) {
        struct cdm_slot *slot = &job->slots[job->seq_emit % job->window];
        if (!slot->done)
            return;
        job->emitting = true;
        pthread_mutex_unlock(&job->lock);
        int rc = job->emit(w, &slot->item, slot->buf);
        pthread_mutex_lock(&job->lock);
        job->emitting = false;
        slot->done = false;
        if (rc < 0) {
            worker_failed(job, w, rc);
        } else {
            job->seq_emit++;
            job->done += slot->item.length;
            job->completed++;
        }
        pthread_cond_broadcast(&job->cond);
    }
}

/* Lock held: the next item for W into ITEM (and, ordered, its slot into *SLOT).  1 = item,
 * 0 = W should exit. */
static int take_item(struct cdm_job *job, struct cdm_worker *w, struct cdm_item *item,
                     struct cdm_slot **slot)
{
    for (;;) {
        if (job->stop || atomic_load(&job->ctx->cancel))
            return 0;
        if (job->emit != NULL && job->seq_next - job->seq_emit >= job->window) {
            pthread_cond_wait(&job->cond, &job->lock);      /* the window is full */
            continue;
        }
        int rc = job->next(job, item);
        if (rc <= 0) {
            if (rc < 0)
                job->stop = true;
            return 0;
        }
        if (job->emit != NULL) {
            *slot = &job->slots[job->seq_next % job->window];
            (*slot)->item = *item;
            (*slot)->done = false;
            job->seq_next++;
            w->buf = (*slot)->buf;
        }
        return 1;
    }
}

static void *worker_main(void *arg)
{
    struct cdm_worker *w = arg;
    struct cdm_job *job = w->job;
    struct cdm_item item;
    struct cdm_slot *slot = NULL;

    pthread_mutex_lock(&job->lock);
    while (take_item(job, w, &item, &slot)) {
        pthread_mutex_unlock(&job->lock);
        int rc = job->work(w, &item);
        pthread_mutex_lock(&job->lock);
        if (rc < 0) {
            worker_failed(job, w, rc);
        } else if (job->emit != NULL) {
            slot->done = true;
            drain(job, w);
        } else {
            job->done += item.length;
            job->completed++;
        }
        pthread_cond_broadcast(&job->cond);
    }
    job->running--;
    pthread_cond_broadcast(&job->cond);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* The workers and buffers of a run. */
struct crew {
    unsigned n;
    unsigned started;
    struct cdm_worker *workers;
    pthread_t *tids;
    struct cdm_slot *slots;
    unsigned nslots;
};

static void crew_free(struct crew *c)
{
    for (unsigned i = 0; c->workers != NULL && i < c->n; i++) {
        if (c->slots == NULL)
            free(c->workers[i].buf);
        free(c->workers[i].scratch);
    }
    for (unsigned i = 0; c->slots != NULL && i < c->nslots; i++)
        free(c->slots[i].buf);
    free(c->workers);
    free(c->tids);
    free(c->slots);
}

/* Allocate C's workers with their buffers (or, ordered, the slots).  0 or -ENOMEM. */
static int crew_alloc(struct crew *c, struct cdm_job *job)
{
    bool ok;
    c->workers = calloc(c->n, sizeof *c->workers);
    c->tids = calloc(c->n, sizeof *c->tids);
    ok = c->workers != NULL && c->tids != NULL;
    if (ok && job->emit != NULL) {
        c->nslots = job->window;
        c->slots = calloc(c->nslots, sizeof *c->slots);
        ok = c->slots != NULL;
        for (unsigned i = 0; ok && i < c->nslots; i++)
            ok = (c->slots[i].buf = cdm_alloc_aligned(job->buf_size)) != NULL;
    }
    for (unsigned i = 0; ok && i < c->n; i++) {
        c->workers[i].job = job;
        if (job->emit == NULL)
            ok = (c->workers[i].buf = cdm_alloc_aligned(job->buf_size)) != NULL;
        if (ok && job->scratch_size)
            ok = (c->workers[i].scratch = cdm_alloc_aligned(job->scratch_size)) != NULL;
    }
    if (!ok) {
        crew_free(c);
        return -ENOMEM;
    }
    return 0;
}

/* Lock held: wait for the workers, reporting progress and watching for cancellation.
 * Returns true when the job was cancelled. */
static bool supervise(struct cdm_job *job)
{
    cdm_ctx *ctx = job->ctx;
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
            pthread_cond_broadcast(&job->cond);
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
                pthread_cond_broadcast(&job->cond);
            }
        }
    }
    return cancelled;
}

static void job_reset(struct cdm_job *job, unsigned n)
{
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->cond, NULL);
    job->done = 0;
    job->completed = 0;
    job->running = 0;
    job->stop = false;
    cdm_error_clear(&job->error);
    job->seq_next = job->seq_emit = 0;
    job->emitting = false;
    if (job->emit != NULL && job->window == 0)
        job->window = 2 * n;
}

/* Run JOB (see internal.h).  0, -errno or -CDM_E*; the message goes to JOB->ctx. */
int cdm_job_run(struct cdm_job *job, struct cdm_copy_stats *stats)
{
    cdm_ctx *ctx = job->ctx;
    struct crew c = {.n = job->nthreads ? job->nthreads : CDM_DEFAULT_THREADS};
    if (c.n > CDM_MAX_THREADS)
        c.n = CDM_MAX_THREADS;
    job_reset(job, c.n);
    if (crew_alloc(&c, job) < 0) {
        pthread_cond_destroy(&job->cond);
        pthread_mutex_destroy(&job->lock);
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "cannot allocate I/O buffers");
    }
    job->slots = c.slots;

    pthread_mutex_lock(&job->lock);
    for (unsigned i = 0; i < c.n; i++) {
        if (pthread_create(&c.tids[i], NULL, worker_main, &c.workers[i]) != 0)
            break;
        c.started++;
        job->running++;
    }
    if (c.started == 0)
        cdm_error_set(&job->error, CDM_SIDE_NONE, -EAGAIN, "cannot start worker threads");
    bool cancelled = supervise(job);
    pthread_mutex_unlock(&job->lock);

    for (unsigned i = 0; i < c.started; i++)
        pthread_join(c.tids[i], NULL);
    for (unsigned i = 0; i < c.n; i++)
        cdm_stats_add(stats, &c.workers[i].io.stats);
    crew_free(&c);
    job->slots = NULL;
    pthread_cond_destroy(&job->cond);
    pthread_mutex_destroy(&job->lock);

    if (job->error.rc < 0)
        return cdm_set_error(ctx, job->error.side, job->error.rc, "%s", job->error.msg);
    if (cancelled || atomic_load(&ctx->cancel))
        return cdm_set_error(ctx, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    if (ctx->progress != NULL && ctx->progress(ctx->progress_opaque, job->total, job->total))
        return cdm_set_error(ctx, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    return 0;
}
