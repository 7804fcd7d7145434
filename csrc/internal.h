/* internal.h -- shared internals of the native core: the context, the worker pool that
 * runs every copy (source -> items -> workers -> target), and the target writer with its
 * zeroing-method cascade.  Nothing here is part of the public API.
 */
#ifndef CDIMOVER_INTERNAL_H
#define CDIMOVER_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cdimover.h"

#define CDM_ERRMSG_MAX 512
#define CDM_ALIGN 4096u                    /* buffer and O_DIRECT alignment */
#define CDM_DEFAULT_REQUEST (4u << 20)
#define CDM_MAX_REQUEST (64u << 20)
#define CDM_DEFAULT_SPARSE 4096u
#define CDM_DEFAULT_THREADS 4u
#define CDM_MAX_THREADS 16u
#define CDM_ZERO_BUF (1u << 20)            /* zeros written per call by CDM_ZERO_WRITE */
#define CDM_HOLE_CHUNK (1ull << 30)        /* a hole is zeroed in pieces of at most 1 GiB */
#define CDM_REPROBE_AFTER 64u              /* retry a failed zeroing method after this many ops */
#define CDM_N_ZERO_METHODS 5

#define CDM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CDM_MAX(a, b) ((a) > (b) ? (a) : (b))
#define CDM_IS_ALIGNED(x, a) (((x) & ((uint64_t)(a) - 1)) == 0)
#define CDM_ALIGN_DOWN(x, a) ((x) & ~((uint64_t)(a) - 1))
#define CDM_ALIGN_UP(x, a) (((x) + ((uint64_t)(a) - 1)) & ~((uint64_t)(a) - 1))

struct cdm_ctx {
    cdm_progress_fn progress;
    void *progress_opaque;
    atomic_int cancel;
    int errside;
    char errmsg[CDM_ERRMSG_MAX];
};

/* ctx.c */
int cdm_set_error(cdm_ctx *ctx, int side, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int cdm_vformat_error(char *buf, size_t cap, const char *fmt, va_list ap);
void cdm_clear_error(cdm_ctx *ctx);
bool cdm_errno_unsupported(int err);

/* io.c: full positional reads and writes that retry on EINTR and short transfers. */
int cdm_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got);
int cdm_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
void *cdm_alloc_aligned(size_t size);

/* extents.c: the data extent at or after guest offset POS (both END when none). */
int cdm_next_data(int map_fd, uint64_t map_offset, uint64_t pos, uint64_t end,
                  uint64_t *data_start, uint64_t *data_end);

/* ---- worker pool (pool.c) ------------------------------------------------------------ */

enum cdm_item_kind {
    CDM_ITEM_DATA = 0,      /* read [offset, offset+length) and write it with zero detection */
    CDM_ITEM_HOLE = 1,      /* the source reads as zeros here */
    CDM_ITEM_CUSTOM = 2     /* interpreted by the job's work function */
};

struct cdm_item {
    uint64_t offset;        /* guest (virtual) offset */
    uint64_t length;
    uint32_t kind;
    uint64_t aux[2];        /* job-specific (e.g. a host offset) */
};

struct cdm_job;

struct cdm_worker {
    struct cdm_job *job;
    uint8_t *buf;           /* job->buf_size bytes, CDM_ALIGN-aligned */
    uint8_t *scratch;       /* job->scratch_size bytes or NULL */
    struct cdm_copy_stats stats;
    int errside;
    char errmsg[CDM_ERRMSG_MAX];
};

/* Produce the next item; called with the job lock held.  1 = item, 0 = no more, <0 = error
 * (message via cdm_job_fail). */
typedef int (*cdm_next_fn)(struct cdm_job *job, struct cdm_item *item);
/* Process one item on a worker thread, without the lock.  0 or -errno (cdm_worker_fail). */
typedef int (*cdm_work_fn)(struct cdm_worker *w, const struct cdm_item *item);

struct cdm_job {
    /* set by the caller */
    cdm_ctx *ctx;
    void *state;
    cdm_next_fn next;
    cdm_work_fn work;
    size_t buf_size;
    size_t scratch_size;
    unsigned nthreads;
    uint64_t total;         /* progress total */
    /* owned by the pool */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t done;
    unsigned completed;     /* items finished since the last progress report */
    unsigned running;
    int err;
    int errside;
    bool stop;
    char errmsg[CDM_ERRMSG_MAX];
};

/* Run JOB to completion on JOB->nthreads workers, calling the context's progress callback
 * from this thread.  Worker statistics are added to STATS.  0, -errno or -CDM_E*. */
int cdm_job_run(struct cdm_job *job, struct cdm_copy_stats *stats);
int cdm_worker_fail(struct cdm_worker *w, int side, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int cdm_job_fail(struct cdm_job *job, int side, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void cdm_stats_add(struct cdm_copy_stats *into, const struct cdm_copy_stats *from);

/* ---- target writer (target.c) --------------------------------------------------------- */

/* Which zeroing methods a target may use, in order of preference. */
enum cdm_zero_policy {
    CDM_ZP_SPARSE = 0,      /* punch hole, zero range, BLKZEROOUT, write: deallocate if possible */
    CDM_ZP_PROVISION = 1,   /* zero range, BLKZEROOUT, write: keep the blocks allocated */
    CDM_ZP_WRITE = 2        /* write zeros: every block physically written */
};

struct cdm_target {
    int fd;                 /* buffered fd */
    int policy;             /* enum cdm_zero_policy */
    int dfd;                /* O_DIRECT fd or -1 */
    bool is_blockdev;
    bool known_zero;        /* target reads as zeros where nothing was written */
    bool detect_zeros;
    uint32_t sector;        /* logical sector size: alignment of device zeroing */
    uint32_t sparse_size;   /* zero-detection granularity */
    uint8_t *zeros;         /* CDM_ZERO_BUF zero bytes, aligned */
    pthread_mutex_t lock;   /* protects the method state below */
    uint32_t skip[CDM_N_ZERO_METHODS];  /* >0: method failed; ops left before re-probing */
};

int cdm_target_init(struct cdm_target *t, int fd, int dfd, bool is_blockdev, uint32_t sector,
                    uint32_t sparse_size, bool known_zero, bool detect_zeros, int policy);
void cdm_target_fini(struct cdm_target *t);
/* Write LEN bytes of BUF at OFF, turning all-zero SPARSE_SIZE blocks into zeroed ranges. */
int cdm_target_put(struct cdm_target *t, struct cdm_worker *w, const uint8_t *buf,
                   uint64_t off, size_t len);
/* Write LEN bytes of BUF at OFF as data (O_DIRECT when aligned). */
int cdm_target_write(struct cdm_target *t, struct cdm_worker *w, const uint8_t *buf,
                     uint64_t off, size_t len);
/* Make [OFF, OFF+LEN) read as zeros (nothing when the target is known to be zero). */
int cdm_target_zero(struct cdm_target *t, struct cdm_worker *w, uint64_t off, uint64_t len);
/* zero.c: zero [OFF, OFF+LEN) by T's policy, edges written on devices; reason in WHY. */
int cdm_zero_range_why(struct cdm_target *t, struct cdm_copy_stats *st, uint64_t off,
                       uint64_t len, char *why, size_t why_cap);
/* prealloc.c: set up T for copying SIZE bytes with preallocation MODE (files are reserved
 * up front; devices provision zero ranges instead of punching them). */
int cdm_prealloc_prepare(struct cdm_target *t, int mode, uint64_t size,
                         struct cdm_copy_stats *st, char *why, size_t why_cap);
/* prealloc.c: after a preallocating copy, count zeroed ranges as allocated. */
void cdm_prealloc_account(struct cdm_copy_stats *st);
/* copy.c: validate OPTS, with the defaults for request and sparse sizes; -EINVAL + message. */
int cdm_check_copy_opts(cdm_ctx *ctx, const struct cdm_copy_opts *opts, uint32_t *request,
                        uint32_t *sparse);
/* copy.c: sync the target after a job ending with RC (also when cancelled); see copy.c. */
int cdm_finish_target(cdm_ctx *ctx, struct cdm_target *t, const struct cdm_copy_opts *opts,
                      int rc);
/* fdatasync the target. */
int cdm_target_sync(struct cdm_target *t, cdm_ctx *ctx);

#endif /* CDIMOVER_INTERNAL_H */
