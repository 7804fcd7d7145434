/* internal.h -- shared internals of the native core: the error channel, the context, the
 * reader interface (an ops table per kind of source), the worker pool that runs every job
 * (reader -> items -> workers -> writer), the target writer with its zeroing-method cascade,
 * and the job driver shared by every producer.  Nothing here is part of the public API.
 */
#ifndef CDIMOVER_INTERNAL_H
#define CDIMOVER_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

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

/* ---- one error channel (ctx.c) -------------------------------------------------------- */

/* The first failure of an operation: its code, the endpoint concerned and the message.  Every
 * layer records into one of these (the context, a worker, the job, a writer); the first
 * failure wins and later ones are dropped, so the message always explains the code returned. */
struct cdm_error {
    int rc;                 /* 0, or the negative code of the first failure */
    int side;               /* CDM_SIDE_* */
    char msg[CDM_ERRMSG_MAX];
};

int cdm_error_set(struct cdm_error *e, int side, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int cdm_error_take(struct cdm_error *into, const struct cdm_error *from);
void cdm_error_clear(struct cdm_error *e);

/* Statistics and the first error of one thread of I/O (a worker, or a writer's caller). */
struct cdm_io {
    struct cdm_copy_stats stats;
    struct cdm_error error;
};

struct cdm_ctx {
    cdm_progress_fn progress;
    void *progress_opaque;
    atomic_int cancel;
    struct cdm_error error;
};

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

/* ---- readers (reader_file.c) ------------------------------------------------------------ */

enum cdm_read_flags {
    CDM_READ_CACHED = 1,    /* a small read: through the page cache, pages kept for neighbours */
    CDM_READ_ROOM = 2       /* BUF has room for LEN rounded up to CDM_ALIGN (for O_DIRECT) */
};

struct cdm_reader;

/* What a source must do.  READ is required; the others may be NULL. */
struct cdm_reader_ops {
    const char *name;
    /* Read exactly LEN bytes at OFF into BUF (FLAGS: CDM_READ_*).  0; -EIO when the source
     * ends before OFF+LEN; -errno.  The message goes to IO->error, counters to IO->stats. */
    int (*read)(struct cdm_reader *r, void *buf, size_t len, uint64_t off, unsigned flags,
                struct cdm_io *io);
    /* The data extent at or after POS within [POS, END) (both END when the rest reads as
     * zeros).  0 or -errno, without a message. */
    int (*next_data)(struct cdm_reader *r, uint64_t pos, uint64_t end, uint64_t *data_start,
                     uint64_t *data_end);
    /* The source's size now, to notice a source that changed during a job.  0 or -errno. */
    int (*get_size)(struct cdm_reader *r, uint64_t *size);
    /* Release what the reader owns (never the caller's descriptors). */
    void (*close)(struct cdm_reader *r);
};

struct cdm_reader {
    const struct cdm_reader_ops *ops;
    uint64_t size;          /* bytes, when the reader was opened */
    uint32_t align;         /* required alignment of offsets and lengths (1: any) */
    uint32_t pref_size;     /* preferred bytes per read (0: no preference) */
};

/* A regular file or block device: buffered fd, optional O_DIRECT twin, optional extent map. */
struct cdm_file_reader {
    struct cdm_reader r;
    int fd;
    int dfd;                /* O_DIRECT twin or -1 */
    int map_fd;             /* fd whose SEEK_DATA map describes the source, or -1 (no map) */
    uint64_t map_offset;    /* source offset 0 is map_fd offset MAP_OFFSET */
};

int cdm_fd_size(int fd, uint64_t *size);
int cdm_file_reader_init(struct cdm_file_reader *fr, int fd, int dfd, int map_fd,
                         uint64_t map_offset, struct cdm_error *err);

/* CLOCK_MONOTONIC in nanoseconds (the stats' busy times). */
static inline uint64_t cdm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline int cdm_read(struct cdm_reader *r, void *buf, size_t len, uint64_t off,
                           unsigned flags, struct cdm_io *io)
{
    uint64_t t0 = cdm_now_ns();
    int rc = r->ops->read(r, buf, len, off, flags, io);
    io->stats.read_ns += cdm_now_ns() - t0;
    return rc;
}

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
struct cdm_target;
struct cdm_slot;

struct cdm_worker {
    struct cdm_job *job;
    uint8_t *buf;           /* job->buf_size bytes, CDM_ALIGN-aligned (ordered: the item's slot) */
    uint8_t *scratch;       /* job->scratch_size bytes or NULL */
    struct cdm_io io;       /* this worker's statistics and first error */
};

/* Produce the next item; called with the job lock held.  1 = item, 0 = no more, <0 = error
 * (message via cdm_job_fail).  Items come in increasing offset order. */
typedef int (*cdm_next_fn)(struct cdm_job *job, struct cdm_item *item);
/* Process one item on a worker thread, without the lock.  0 or -errno (message in W->io). */
typedef int (*cdm_work_fn)(struct cdm_worker *w, const struct cdm_item *item);
/* Ordered mode: hand on a processed item whose result is in BUF; called in offset order,
 * one call at a time, without the lock.  0 or -errno (message in W->io). */
typedef int (*cdm_emit_fn)(struct cdm_worker *w, const struct cdm_item *item, uint8_t *buf);

struct cdm_job {
    /* set by the caller */
    cdm_ctx *ctx;
    void *state;
    cdm_next_fn next;
    cdm_work_fn work;
    cdm_emit_fn emit;       /* non-NULL: ordered mode */
    unsigned window;        /* ordered mode: items in flight at most (0 = 2 x threads) */
    size_t buf_size;
    size_t scratch_size;
    unsigned nthreads;
    uint64_t total;         /* progress total */
    struct cdm_reader *src; /* the source, for work functions (may be NULL) */
    struct cdm_target *target;  /* the target writer, for work functions (may be NULL) */
    /* owned by the pool */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t done;
    unsigned completed;     /* items finished since the last progress report */
    unsigned running;
    bool stop;
    struct cdm_error error;
    struct cdm_slot *slots; /* ordered mode: WINDOW slots */
    uint64_t seq_next;      /* ordered mode: sequence number of the next item produced */
    uint64_t seq_emit;      /* ordered mode: sequence number of the next item to emit */
    bool emitting;          /* ordered mode: a worker is emitting */
};

/* Run JOB to completion on JOB->nthreads workers, calling the context's progress callback
 * from this thread.  Worker statistics are added to STATS.  0, -errno or -CDM_E*. */
int cdm_job_run(struct cdm_job *job, struct cdm_copy_stats *stats);
int cdm_job_fail(struct cdm_job *job, int side, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void cdm_stats_add(struct cdm_copy_stats *into, const struct cdm_copy_stats *from);

/* ---- target writer (target.c, zero.c, prealloc.c, writer.c) ----------------------------- */

/* Which zeroing methods a target may use, in order of preference. */
enum cdm_zero_policy {
    CDM_ZP_SPARSE = 0,      /* punch hole, zero range, BLKZEROOUT, write: deallocate if possible */
    CDM_ZP_PROVISION = 1,   /* zero range, BLKZEROOUT, write: keep the blocks allocated */
    CDM_ZP_WRITE = 2        /* write zeros: every block physically written */
};

/* The shared, thread-safe part of a writer: every worker writes through it with its own
 * struct cdm_io. */
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
int cdm_target_put(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf, uint64_t off,
                   size_t len);
int cdm_target_write(struct cdm_target *t, struct cdm_io *io, const uint8_t *buf, uint64_t off,
                     size_t len);
int cdm_target_zero(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len);
int cdm_target_sync(struct cdm_target *t, struct cdm_error *err);
/* zero.c */
int cdm_zero_range_io(struct cdm_target *t, struct cdm_io *io, uint64_t off, uint64_t len);
/* prealloc.c */
int cdm_prealloc_prepare(struct cdm_target *t, int mode, uint64_t size, struct cdm_io *io);
void cdm_prealloc_account(struct cdm_copy_stats *st);

/* The public writer handle (writer.c); jobs embed one too. */
struct cdm_writer {
    cdm_ctx *ctx;
    struct cdm_target t;
    uint64_t size;
    int preallocation;
    uint32_t flags;         /* CDM_COPY_* */
    bool finished;          /* finish or abort was called */
    struct cdm_io io;       /* the caller's statistics and first error */
    uint8_t *bounce;        /* aligned staging buffer of cdm_writer_put, or NULL */
};

int cdm_writer_setup(struct cdm_writer *w, cdm_ctx *ctx, int fd, int direct_fd,
                     const struct cdm_writer_opts *opts);
int cdm_writer_end(struct cdm_writer *w, int rc, struct cdm_copy_stats *stats);
void cdm_writer_cleanup(struct cdm_writer *w);

/* ---- the job driver (job.c) ------------------------------------------------------------- */

/* What a producer (RAW copy, QCOW2 conversion, ...) supplies to the driver. */
struct cdm_producer {
    void *state;
    cdm_next_fn next;
    cdm_work_fn work;
    size_t buf_size;
    size_t scratch_size;
    int scan_method;        /* reported in the statistics */
    cdm_emit_fn emit;       /* non-NULL: ordered mode (see pool.c) */
    unsigned window;
};

int cdm_job_begin(cdm_ctx *ctx, const struct cdm_copy_opts *opts, uint32_t *request,
                  uint32_t *sparse);
int cdm_job_drive(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                  const struct cdm_copy_opts *opts, const struct cdm_producer *p,
                  struct cdm_copy_stats *stats);

/* Producers over any reader (copy.c, convert.c, qcow2.c). */
struct cdm_hasher;
int cdm_copy_reader(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                    const struct cdm_copy_opts *opts, struct cdm_hasher *hash,
                    struct cdm_copy_stats *stats);
int cdm_qcow2_convert_reader(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                             const struct cdm_copy_opts *opts, struct cdm_copy_stats *stats);
int cdm_qcow2_inspect_reader(cdm_ctx *ctx, struct cdm_reader *src, struct cdm_qcow2_info *out);

/* ---- remote sources (source.c, http.c) -------------------------------------------------- */

struct cdm_pipeline;

struct cdm_source_ops {
    /* The source as a random-access reader, or NULL when it has none (no ranges).  With
     * RANDOM false, a reader that may serve only the first bytes. */
    struct cdm_reader *(*reader)(cdm_source *src, bool random);
    /* Push the whole source, in order, into the pipeline made by MAKE (called again to start
     * over from byte 0 when a transfer cannot resume).  0 or error (message in ERR). */
    int (*stream)(cdm_source *src, cdm_ctx *ctx, cdm_writer *w,
                  const struct cdm_stream_opts *opts, struct cdm_stream_result *res);
    void (*info)(const cdm_source *src, struct cdm_source_info *out);
    /* Which context an operation runs under (for cancellation and progress), or NULL. */
    void (*bind)(cdm_source *src, cdm_ctx *ctx);
    void (*destroy)(cdm_source *src);
};

struct cdm_source {
    const struct cdm_source_ops *ops;
};

#endif /* CDIMOVER_INTERNAL_H */
