/* test_pool.c -- the worker pool's ordered mode: items processed in any order by workers with
 * random delays are emitted in offset order, one emit at a time, with at most WINDOW items in
 * flight, every byte arriving once; a failing emit stops the job with its message.
 */
#include <assert.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define N_ITEMS 3000u
#define MAX_LEN 8192u
#define WINDOW 6u

struct state {
    uint64_t lengths[N_ITEMS];
    unsigned produced;          /* under the job lock */
    uint64_t pos;               /* under the job lock */
    uint64_t next_emit;         /* offset the next emit must have */
    uint64_t bytes;
    atomic_uint emitted;        /* written by emit, read by next() */
    unsigned fail_at;           /* emit number that fails, or N_ITEMS + 1 */
    unsigned max_in_flight;
    atomic_int emitters;        /* emits running now */
    atomic_uint finish_seq;     /* order in which work finished */
    unsigned finished_at[N_ITEMS];
    unsigned out_of_order;      /* items that finished before an earlier item */
};

static uint8_t pattern(uint64_t off)
{
    return (uint8_t)(off * 2654435761u >> 13);
}

static int next(struct cdm_job *job, struct cdm_item *item)
{
    struct state *s = job->state;
    if (s->produced == N_ITEMS)
        return 0;
    memset(item, 0, sizeof *item);
    item->offset = s->pos;
    item->length = s->lengths[s->produced];
    item->kind = CDM_ITEM_CUSTOM;
    item->aux[0] = s->produced++;
    s->pos += item->length;
    unsigned in_flight = s->produced - atomic_load(&s->emitted);
    if (in_flight > s->max_in_flight)
        s->max_in_flight = in_flight;
    return 1;
}

static int work(struct cdm_worker *w, const struct cdm_item *item)
{
    struct state *s = w->job->state;
    unsigned seed = (unsigned)(item->offset * 31u + item->length);
    struct timespec d = {0, (long)(rand_r(&seed) % 200000)};
    nanosleep(&d, NULL);
    for (uint64_t i = 0; i < item->length; i++)
        w->buf[i] = pattern(item->offset + i);
    s->finished_at[item->aux[0]] = atomic_fetch_add(&s->finish_seq, 1);
    return 0;
}

static int emit(struct cdm_worker *w, const struct cdm_item *item, uint8_t *buf)
{
    struct state *s = w->job->state;
    assert(atomic_fetch_add(&s->emitters, 1) == 0);
    assert(item->offset == s->next_emit);
    for (uint64_t i = 0; i < item->length; i++)
        assert(buf[i] == pattern(item->offset + i));
    struct timespec d = {0, 20000};
    nanosleep(&d, NULL);
    int rc = 0;
    if (atomic_load(&s->emitted) == s->fail_at)
        rc = cdm_error_set(&w->io.error, CDM_SIDE_TARGET, -EPIPE, "stream closed at %llu",
                           (unsigned long long)item->offset);
    else {
        s->next_emit += item->length;
        s->bytes += item->length;
        atomic_fetch_add(&s->emitted, 1);
    }
    atomic_fetch_sub(&s->emitters, 1);
    return rc;
}

static uint64_t setup(struct state *s, struct cdm_job *job, cdm_ctx *ctx, unsigned fail_at)
{
    memset(s, 0, sizeof *s);
    atomic_init(&s->emitters, 0);
    atomic_init(&s->finish_seq, 0);
    atomic_init(&s->emitted, 0);
    s->fail_at = fail_at;
    uint64_t total = 0;
    unsigned seed = 7;
    for (unsigned i = 0; i < N_ITEMS; i++) {
        s->lengths[i] = 1 + (uint64_t)(rand_r(&seed) % MAX_LEN);
        total += s->lengths[i];
    }
    memset(job, 0, sizeof *job);
    job->ctx = ctx;
    job->state = s;
    job->next = next;
    job->work = work;
    job->emit = emit;
    job->window = WINDOW;
    job->buf_size = MAX_LEN;
    job->nthreads = 4;
    job->total = total;
    return total;
}

static void test_ordered(void)
{
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    struct state *s = malloc(sizeof *s);
    struct cdm_job job;
    struct cdm_copy_stats stats;
    memset(&stats, 0, sizeof stats);
    uint64_t total = setup(s, &job, ctx, N_ITEMS + 1);
    int rc = cdm_job_run(&job, &stats);
    assert(rc == 0);
    assert(atomic_load(&s->emitted) == N_ITEMS);
    assert(s->bytes == total && s->next_emit == total);
    assert(s->max_in_flight <= WINDOW);
    /* The workers really did finish items out of order. */
    for (unsigned i = 1; i < N_ITEMS; i++)
        if (s->finished_at[i] < s->finished_at[i - 1])
            s->out_of_order++;
    assert(s->out_of_order > 0);
    printf("ordered: %u items, %llu bytes, %u finished early, max %u in flight\n", N_ITEMS,
           (unsigned long long)total, s->out_of_order, s->max_in_flight);
    free(s);
    cdm_ctx_free(ctx);
}

static void test_emit_failure(void)
{
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    struct state *s = malloc(sizeof *s);
    struct cdm_job job;
    struct cdm_copy_stats stats;
    memset(&stats, 0, sizeof stats);
    setup(s, &job, ctx, 100);
    int rc = cdm_job_run(&job, &stats);
    assert(rc == -EPIPE);
    assert(atomic_load(&s->emitted) == 100);
    assert(strstr(cdm_ctx_errmsg(ctx), "stream closed at") != NULL);
    assert(cdm_ctx_errside(ctx) == CDM_SIDE_TARGET);
    free(s);
    cdm_ctx_free(ctx);
}

int main(void)
{
    test_ordered();
    test_emit_failure();
    printf("test_pool: ok\n");
    return 0;
}
