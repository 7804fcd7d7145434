/* stream.c -- sequential streams: a byte stream, maybe compressed, holding a RAW or QCOW2
 * image, decoded in one pass onto a writer.  The bytes pushed into a pipeline go through
 * the digest (over the bytes as received), a detection stage that recognises the
 * compression by its magic bytes, the decompressor (decomp.c), a second detection stage
 * that recognises a QCOW2 image, and finally the RAW sink (which stages the bytes into
 * large aligned pieces for the writer) or the streaming QCOW2 converter.  cdm_stream_fd
 * feeds a pipeline from a file descriptor, a pipe as well as a file.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "stream.h"

#define RAW_STAGE (4u << 20)                 /* bytes the RAW sink hands the writer at once */
#define READ_BYTES (1u << 20)                /* bytes per read of cdm_stream_fd */
#define DEFAULT_MEM_LIMIT (64ull << 20)      /* QCOW2 conversion memory when opts say 0 */
#define QCOW2_SLACK (64ull << 20)            /* metadata a QCOW2 file may add to its size */
#define PROGRESS_NS 100000000ll              /* progress and cancellation: every 100 ms */
#define TAR_SLACK (1ull << 30)              /* a layer's bytes besides the image */
#define HEAD_MAX 8                           /* bytes a detection stage may need */
#define ULL(v) ((unsigned long long)(v))

static const uint8_t QCOW2_MAGIC[] = {'Q', 'F', 'I', 0xfb};

/* Record a failure RC of a stage that returned without a message of its own. */
static int ensure_message(struct cdm_error *err, int rc, const char *what)
{
    if (rc < 0 && err->rc == 0)
        cdm_error_set(err, CDM_SIDE_NONE, rc, "%s failed: %s", what,
                      rc <= -CDM_EFORMAT ? "library error" : strerror(-rc));
    return rc < 0 ? err->rc : rc;
}

/* ---- the RAW sink ------------------------------------------------------------------------ */

struct raw_sink {
    struct cdm_sink sink;
    cdm_writer *w;
    struct cdm_error *err;
    uint8_t *buf;           /* RAW_STAGE bytes, aligned */
    size_t fill;            /* bytes staged in BUF */
    uint64_t base;          /* target offset of BUF[0] */
    uint64_t total;         /* bytes received */
};

/* Write LEN bytes of BUF at R->base onto the writer and advance R->base. */
static int raw_write(struct raw_sink *r, const uint8_t *buf, size_t len)
{
    int rc = cdm_writer_put(r->w, buf, len, r->base);
    if (rc < 0) {
        cdm_error_take(r->err, &r->w->io.error);
        cdm_error_take(r->err, &r->w->ctx->error);
        return cdm_error_set(r->err, CDM_SIDE_TARGET, rc,
                             "cannot write %zu bytes at offset %llu of the target: %s", len,
                             ULL(r->base), strerror(-rc));
    }
    r->base += len;
    return 0;
}

static int raw_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct raw_sink *r = (struct raw_sink *)s;
    if (len > r->w->size - r->total)
        return cdm_error_set(r->err, CDM_SIDE_TARGET, -CDM_ETOOSMALL,
                             "the image is larger than the target (%llu bytes): at least "
                             "%llu bytes arrived",
                             ULL(r->w->size), ULL(r->total + len));
    r->total += len;
    int rc = 0;
    while (rc == 0 && len > 0) {
        size_t n;
        if (r->fill == 0 && len >= RAW_STAGE) {
            /* Whole pieces straight from the caller's buffer: no copy. */
            n = len - len % RAW_STAGE;
            rc = raw_write(r, buf, n);
        } else {
            n = CDM_MIN(len, RAW_STAGE - r->fill);
            memcpy(r->buf + r->fill, buf, n);
            r->fill += n;
            if (r->fill == RAW_STAGE) {
                rc = raw_write(r, r->buf, r->fill);
                r->fill = 0;
            }
        }
        buf += n;
        len -= n;
    }
    return rc;
}

static int raw_end(struct cdm_sink *s, struct cdm_stream_result *res)
{
    struct raw_sink *r = (struct raw_sink *)s;
    int rc = 0;
    if (r->fill > 0)
        rc = raw_write(r, r->buf, r->fill);
    r->fill = 0;
    if (res != NULL) {
        res->image_size = r->total;
        res->format = CDM_FORMAT_RAW;
    }
    return rc;
}

static void raw_destroy(struct cdm_sink *s)
{
    struct raw_sink *r = (struct raw_sink *)s;
    free(r->buf);
    free(r);
}

/* A RAW sink onto W into *OUT: the bytes pushed go to offset 0 onwards, staged in aligned
 * pieces of RAW_STAGE bytes; more than W's size is -CDM_ETOOSMALL.  Messages (also the
 * writer's) go to ERR.  0 or -ENOMEM. */
int cdm_raw_sink_new(cdm_writer *w, struct cdm_error *err, struct cdm_sink **out)
{
    *out = NULL;
    struct raw_sink *r = calloc(1, sizeof *r);
    uint8_t *buf = cdm_alloc_aligned(RAW_STAGE);
    if (r == NULL || buf == NULL) {
        free(r);
        free(buf);
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory for the RAW stage");
    }
    r->sink = (struct cdm_sink){.push = raw_push, .end = raw_end, .destroy = raw_destroy};
    r->w = w;
    r->err = err;
    r->buf = buf;
    *out = &r->sink;
    return 0;
}

/* ---- detection ----------------------------------------------------------------------------- */

enum detect_what { DETECT_COMPRESSION, DETECT_FORMAT };

/* Holds the first bytes until their magic decides what follows, then builds the rest of
 * the pipeline and passes everything on.  A declared (not AUTO) compression or format is
 * checked against the magic too. */
struct detect {
    struct cdm_sink sink;
    int what;               /* enum detect_what */
    int wanted;             /* the caller's CDM_COMPRESSION_* / CDM_FORMAT_* */
    int found;              /* the decision, once NEXT exists */
    struct cdm_sink *next;  /* owned; NULL until decided */
    uint8_t head[HEAD_MAX];
    size_t n_head;
    uint64_t bytes;         /* bytes received */
    cdm_writer *w;
    struct cdm_stream_opts opts;    /* tar_dir and tar_skip point to the copies below */
    char *tar_dir, *tar_skip;       /* owned */
    struct cdm_error *err;
};

static int detect_new(int what, cdm_writer *w, const struct cdm_stream_opts *opts,
                      struct cdm_error *err, struct cdm_sink **out);

/* What the head of D says: CDM_*_AUTO while undecided (only when not FINAL). */
static int sniff(const struct detect *d, bool final)
{
    if (d->what == DETECT_COMPRESSION)
        return cdm_compression_sniff(d->head, d->n_head, final);
    size_t n = CDM_MIN(d->n_head, sizeof QCOW2_MAGIC);
    if (memcmp(d->head, QCOW2_MAGIC, n) != 0)
        return CDM_FORMAT_RAW;
    if (n == sizeof QCOW2_MAGIC)
        return CDM_FORMAT_QCOW2;
    return final ? CDM_FORMAT_RAW : CDM_FORMAT_AUTO;
}

static void describe_head(const struct detect *d, char *text, size_t cap)
{
    size_t pos = 0;
    text[0] = '\0';
    for (size_t i = 0; i < d->n_head && pos + 4 < cap; i++)
        pos += (size_t)snprintf(text + pos, cap - pos, "%s%02x", i ? " " : "", d->head[i]);
    if (d->n_head == 0)
        snprintf(text, cap, "nothing");
}

/* The sizes a decompressor may produce: the target's for RAW, plus room for metadata when
 * the stream may hold a QCOW2 file. */
static uint64_t output_limit(const struct detect *d)
{
    uint64_t size = d->w->size;
    if (d->opts.format == CDM_FORMAT_RAW)
        return size;
    uint64_t slack = size / 8 + QCOW2_SLACK;
    return size > UINT64_MAX - slack ? UINT64_MAX : size + slack;
}

/* The bytes an archive holding the image may have: the image's bound plus TAR_SLACK for
 * headers and the other files of a layer. */
static uint64_t tar_limit(const struct detect *d)
{
    uint64_t size = output_limit(d);
    return size > UINT64_MAX - TAR_SLACK ? UINT64_MAX : size + TAR_SLACK;
}

/* Decide D by its head (FINAL: no more bytes will come) and build what follows. */
static int decide(struct detect *d, bool final)
{
    int seen = sniff(d, final);
    if (seen == 0)
        return 0;   /* CDM_COMPRESSION_AUTO == CDM_FORMAT_AUTO: wait for more bytes */
    char head[3 * HEAD_MAX + 8];
    int rc;
    if (d->what == DETECT_COMPRESSION) {
        int c = d->wanted == CDM_COMPRESSION_AUTO ? seen : d->wanted;
        /* A stream ending inside a magic is left to the decoder, which calls it truncated. */
        bool cut = final && (d->n_head == 0 || sniff(d, false) == CDM_COMPRESSION_AUTO);
        if (c != CDM_COMPRESSION_NONE && c != seen && !cut) {
            describe_head(d, head, sizeof head);
            return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                                 "the stream is not %s-compressed: it starts with %s",
                                 cdm_compression_name(c), head);
        }
        struct cdm_sink *tail;
        if (d->opts.tar_dir != NULL)
            rc = cdm_tar_new(d->w, &d->opts, tar_limit(d), d->err, &tail);
        else
            rc = detect_new(DETECT_FORMAT, d->w, &d->opts, d->err, &tail);
        if (rc == 0 && c == CDM_COMPRESSION_NONE)
            d->next = tail;
        else if (rc == 0)
            rc = cdm_decomp_new(c, d->opts.tar_dir != NULL ? tar_limit(d) : output_limit(d),
                                tail, d->err, &d->next);
        d->found = c;
    } else {
        int f = d->wanted == CDM_FORMAT_AUTO ? seen : d->wanted;
        if (f == CDM_FORMAT_QCOW2 && seen != CDM_FORMAT_QCOW2) {
            describe_head(d, head, sizeof head);
            return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                                 "the image is not a QCOW2 file: it starts with %s", head);
        }
        if (f == CDM_FORMAT_QCOW2) {
            uint64_t mem = d->opts.mem_limit ? d->opts.mem_limit : DEFAULT_MEM_LIMIT;
            rc = ensure_message(d->err, cdm_qcow2_stream_new(d->w, mem, d->err, &d->next),
                                "setting up the QCOW2 conversion");
        } else {
            rc = cdm_raw_sink_new(d->w, d->err, &d->next);
        }
        d->found = f;
    }
    if (rc < 0)
        return rc;
    /* Hand on the bytes held for the decision. */
    return d->n_head > 0 ? d->next->push(d->next, d->head, d->n_head) : 0;
}

static int detect_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct detect *d = (struct detect *)s;
    d->bytes += len;
    if (d->next == NULL) {
        size_t n = CDM_MIN(len, HEAD_MAX - d->n_head);
        memcpy(d->head + d->n_head, buf, n);
        d->n_head += n;
        buf += n;
        len -= n;
        int rc = decide(d, false);
        if (rc < 0 || d->next == NULL)
            return rc;
    }
    return len > 0 ? d->next->push(d->next, buf, len) : 0;
}

static int detect_end(struct cdm_sink *s, struct cdm_stream_result *res)
{
    struct detect *d = (struct detect *)s;
    int rc = 0;
    if (d->next == NULL)
        rc = decide(d, true);
    if (rc == 0)
        rc = d->next->end(d->next, res);
    if (res != NULL && d->what == DETECT_COMPRESSION && d->found == CDM_COMPRESSION_NONE)
        res->compression = CDM_COMPRESSION_NONE;
    if (res != NULL && d->what == DETECT_FORMAT) {
        res->format = d->found;
        res->bytes_out = d->bytes;
    }
    return rc;
}

static void detect_destroy(struct cdm_sink *s)
{
    struct detect *d = (struct detect *)s;
    if (d->next != NULL)
        d->next->destroy(d->next);
    free(d->tar_dir);
    free(d->tar_skip);
    free(d);
}

static int detect_new(int what, cdm_writer *w, const struct cdm_stream_opts *opts,
                      struct cdm_error *err, struct cdm_sink **out)
{
    *out = NULL;
    struct detect *d = calloc(1, sizeof *d);
    if (d == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    d->sink = (struct cdm_sink){.push = detect_push, .end = detect_end,
                               .destroy = detect_destroy};
    d->what = what;
    d->wanted = what == DETECT_COMPRESSION ? opts->compression : opts->format;
    d->w = w;
    d->opts = *opts;
    d->err = err;
    if (opts->tar_dir != NULL) {
        /* The caller's strings need not outlive this call: the decision comes later. */
        d->tar_dir = strdup(opts->tar_dir);
        d->tar_skip = strdup(opts->tar_skip != NULL ? opts->tar_skip : "");
        d->opts.tar_dir = d->tar_dir;
        d->opts.tar_skip = d->tar_skip;
        if (d->tar_dir == NULL || d->tar_skip == NULL) {
            detect_destroy(&d->sink);
            return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
        }
    }
    *out = &d->sink;
    return 0;
}

int cdm_detect_new(cdm_writer *w, const struct cdm_stream_opts *opts, struct cdm_error *err,
                   struct cdm_sink **out)
{
    struct cdm_stream_opts inner = *opts;
    inner.tar_dir = NULL;
    inner.tar_skip = NULL;
    return detect_new(DETECT_COMPRESSION, w, &inner, err, out);
}

/* ---- the pipeline --------------------------------------------------------------------------- */

struct cdm_pipeline {
    struct cdm_sink *head;
    struct cdm_hasher hasher;
    struct cdm_error *err;
    uint64_t bytes_in;
    int failed;             /* the first failure; returned from then on */
    bool ended;
    bool expect;            /* EXPECT_DIGEST holds the digest the bytes must have */
    bool draining;          /* decoding failed (CAUSE): the rest goes to the digest alone */
    uint8_t expect_digest[64];
    uint64_t expect_size;   /* with EXPECT: the most bytes the stream may have (0: no bound) */
    struct cdm_error cause;
};

static int check_opts(const struct cdm_stream_opts *o, struct cdm_error *err)
{
    if (o->format < CDM_FORMAT_AUTO || o->format > CDM_FORMAT_QCOW2)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "unknown image format %d", o->format);
    if (o->compression < CDM_COMPRESSION_AUTO || o->compression > CDM_COMPRESSION_ZSTD)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "unknown compression %d",
                             o->compression);
    if (o->hash < CDM_HASH_NONE || o->hash > CDM_HASH_SHA512)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "unknown hash algorithm %d", o->hash);
    if (o->tar_dir != NULL && (o->tar_dir[0] == '\0' || strlen(o->tar_dir) > 200))
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL,
                             "the archive's directory must be 1 to 200 bytes long");
    return 0;
}

/* Bytes of the digest of hash ALGO (CDM_HASH_*, checked). */
static size_t hash_length(int algo)
{
    static const size_t len[] = {[CDM_HASH_NONE] = 0, [CDM_HASH_MD5] = 16,
                                 [CDM_HASH_SHA1] = 20, [CDM_HASH_SHA256] = 32,
                                 [CDM_HASH_SHA512] = 64};
    return len[algo];
}

/* A pipeline for OPTS onto W into *OUT: digest, detection, decompression, then the RAW
 * sink or the QCOW2 converter.  Messages go to ERR, which must outlive the pipeline.
 * 0, -EINVAL (bad options), -ENOMEM or -CDM_EUNSUPPORTED (a digest OpenSSL refuses). */
int cdm_pipeline_new(cdm_writer *w, const struct cdm_stream_opts *opts, struct cdm_error *err,
                     struct cdm_pipeline **out)
{
    *out = NULL;
    int rc = check_opts(opts, err);
    if (rc < 0)
        return rc;
    struct cdm_pipeline *p = calloc(1, sizeof *p);
    if (p == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    p->err = err;
    if (opts->expect_digest != NULL && opts->hash != CDM_HASH_NONE) {
        p->expect = true;
        p->expect_size = opts->expect_size;
        memcpy(p->expect_digest, opts->expect_digest, hash_length(opts->hash));
    }
    rc = cdm_hasher_init(&p->hasher, opts->hash, err);
    if (rc == 0)
        rc = detect_new(DETECT_COMPRESSION, w, opts, err, &p->head);
    if (rc < 0) {
        cdm_pipeline_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

/* The stage failure RC becomes P's, with a message. */
static int fail(struct cdm_pipeline *p, int rc)
{
    p->failed = ensure_message(p->err, rc, "decoding the stream");
    return p->failed;
}

/* The digest of P's bytes is not the one expected (WHY: how that shows): -CDM_EDIGEST,
 * with the decoding failure it caused, if any, in the message. */
static int digest_mismatch(struct cdm_pipeline *p, const char *why)
{
    bool caused = p->draining;
    cdm_error_clear(p->err);
    if (caused)
        cdm_error_set(p->err, CDM_SIDE_SOURCE, -CDM_EDIGEST,
                      "%s (decoding stopped at a corrupted byte: %s)", why, p->cause.msg);
    else
        cdm_error_set(p->err, CDM_SIDE_SOURCE, -CDM_EDIGEST, "%s", why);
    p->draining = false;
    return fail(p, -CDM_EDIGEST);
}

/* A decoding failure RC with an expected digest: the bytes may be corrupted, which the
 * digest tells once they are all in.  Whether P now drains (RC is kept as the cause). */
static bool start_draining(struct cdm_pipeline *p, int rc)
{
    if (!p->expect || rc != -CDM_EFORMAT || p->err->rc != rc)
        return false;
    p->cause = *p->err;
    cdm_error_clear(p->err);
    p->draining = true;
    return true;
}

/* Push the next LEN bytes of the stream (BUF) through P.  0 or the error (message in P's
 * error); after a failure every call returns it again. */
int cdm_pipeline_push(struct cdm_pipeline *p, const uint8_t *buf, size_t len)
{
    if (p->failed < 0)
        return p->failed;
    if (p->ended)
        return fail(p, cdm_error_set(p->err, CDM_SIDE_NONE, -EINVAL,
                                     "bytes pushed after the end of the stream"));
    if (len == 0)
        return 0;
    int rc = cdm_hasher_update(&p->hasher, buf, len, p->err);
    if (rc == 0 && !p->draining) {
        rc = p->head->push(p->head, buf, len);
        if (rc < 0 && start_draining(p, rc))
            rc = 0;
    }
    if (rc < 0)
        return fail(p, rc);
    p->bytes_in += len;
    if (p->expect && p->expect_size != 0 && p->bytes_in > p->expect_size) {
        char why[96];
        snprintf(why, sizeof why, "more than the %llu bytes expected arrived",
                 ULL(p->expect_size));
        return digest_mismatch(p, why);
    }
    return 0;
}

/* With an expected digest: compare it with the one of RES (after the end of P). */
static int check_digest(struct cdm_pipeline *p, const struct cdm_stream_result *res)
{
    if (!p->expect || memcmp(res->digest, p->expect_digest, res->digest_len) == 0) {
        if (p->draining) {
            /* The bytes are the right ones: the decoding failure is the answer. */
            p->draining = false;
            cdm_error_clear(p->err);
            cdm_error_take(p->err, &p->cause);
            return fail(p, p->cause.rc);
        }
        return 0;
    }
    char got[2 * 64 + 1], why[2 * 64 + 96];
    for (uint32_t i = 0; i < res->digest_len; i++)
        snprintf(got + 2 * i, 3, "%02x", res->digest[i]);
    got[2 * res->digest_len] = '\0';
    snprintf(why, sizeof why, "the %llu bytes received have digest %s, not the one expected",
             ULL(p->bytes_in), got);
    return digest_mismatch(p, why);
}

/* The stream ended: complete every stage (truncation is detected here) and fill RES (may be
 * NULL): sizes, what was detected, the digest.  0 or the error. */
int cdm_pipeline_end(struct cdm_pipeline *p, struct cdm_stream_result *res)
{
    if (p->failed < 0)
        return p->failed;
    if (p->ended)
        return fail(p, cdm_error_set(p->err, CDM_SIDE_NONE, -EINVAL, "the stream ended twice"));
    p->ended = true;
    struct cdm_stream_result local;
    if (res == NULL)
        res = &local;
    /* Every field is an output: what no stage fills (a tar layer with no disk in it has no
     * image; only a tar stage sets the tar fields) reads as zero. */
    memset(res, 0, sizeof *res);
    int rc = p->draining ? 0 : p->head->end(p->head, res);
    res->bytes_in = p->bytes_in;
    if (rc < 0 && start_draining(p, rc))
        rc = 0;     /* e.g. a gzip trailer whose CRC fails: the digest tells whether it is
                     * the download that is corrupted */
    if (rc == 0)
        rc = cdm_hasher_final(&p->hasher, res->digest, &res->digest_len, p->err);
    if (rc == 0)
        rc = check_digest(p, res);
    return rc < 0 ? fail(p, rc) : 0;
}

/* Bytes P accepted so far. */
uint64_t cdm_pipeline_bytes_in(const struct cdm_pipeline *p)
{
    return p->bytes_in;
}

/* Release P and every stage (NULL is allowed); the writer stays the caller's. */
void cdm_pipeline_free(struct cdm_pipeline *p)
{
    if (p == NULL)
        return;
    if (p->head != NULL)
        p->head->destroy(p->head);
    cdm_hasher_fini(&p->hasher);
    free(p);
}

/* ---- a file descriptor as the source ---------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

struct feed {
    cdm_ctx *ctx;
    struct cdm_pipeline *p;
    struct cdm_error *err;
    int64_t last_report;
};

/* Cancellation and, every PROGRESS_NS, the progress callback. */
static int heartbeat(struct feed *f, bool force)
{
    cdm_ctx *ctx = f->ctx;
    if (atomic_load(&ctx->cancel))
        return cdm_error_set(f->err, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    if (ctx->progress == NULL)
        return 0;
    int64_t t = now_ns();
    if (!force && t - f->last_report < PROGRESS_NS)
        return 0;
    f->last_report = t;
    if (ctx->progress(ctx->progress_opaque, cdm_pipeline_bytes_in(f->p), 0))
        return cdm_error_set(f->err, CDM_SIDE_NONE, -CDM_ECANCELED, "operation cancelled");
    return 0;
}

/* Wait until FD has bytes (or its end), watching for cancellation meanwhile (a pipe may stay
 * silent for long).  0 or an error. */
static int wait_readable(struct feed *f, int fd)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int n = poll(&pfd, 1, (int)(PROGRESS_NS / 1000000));
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return 0;   /* not pollable: read will tell */
        int rc = heartbeat(f, false);
        if (rc < 0)
            return rc;
    }
}

static int feed_fd(struct feed *f, int fd, uint8_t *buf)
{
    /* A pipe hands over at most its buffer per read (64 KiB by default): ask for room for a
     * whole read.  Refusals (a non-pipe, a limit) change nothing. */
    (void)fcntl(fd, F_SETPIPE_SZ, (int)READ_BYTES);
    int rc = 0;
    while (rc == 0) {
        rc = wait_readable(f, fd);
        if (rc < 0)
            break;
        ssize_t n = read(fd, buf, READ_BYTES);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return cdm_error_set(f->err, CDM_SIDE_SOURCE, -errno,
                                 "cannot read the stream after %llu bytes: %s",
                                 ULL(cdm_pipeline_bytes_in(f->p)), strerror(errno));
        if (n == 0)
            break;
        rc = cdm_pipeline_push(f->p, buf, (size_t)n);
        if (rc == 0)
            rc = heartbeat(f, false);
    }
    return rc;
}

/* Read SRC_FD (a file, pipe or socket; never seeked) to its end and decode it onto W by
 * OPTS (NULL: detect everything, no digest), filling RES (may be NULL).  W stays open.
 * 0, -errno, -EINVAL, -CDM_EFORMAT, -CDM_EUNSUPPORTED, -CDM_ETOOSMALL or -CDM_ECANCELED;
 * the message in CTX. */
int cdm_stream_fd(cdm_ctx *ctx, int src_fd, cdm_writer *w, const struct cdm_stream_opts *opts,
                  struct cdm_stream_result *res)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    struct cdm_stream_result local;
    if (res == NULL)
        res = &local;
    memset(res, 0, sizeof *res);
    struct cdm_stream_opts defaults = {0};
    if (opts == NULL)
        opts = &defaults;
    struct cdm_error err = {0};
    struct feed f = {.ctx = ctx, .err = &err, .last_report = now_ns()};
    uint8_t *buf = NULL;
    int rc = cdm_pipeline_new(w, opts, &err, &f.p);
    if (rc == 0) {
        buf = malloc(READ_BYTES);
        if (buf == NULL)
            rc = cdm_error_set(&err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    }
    if (rc == 0)
        rc = heartbeat(&f, true);
    if (rc == 0)
        rc = feed_fd(&f, src_fd, buf);
    if (rc == 0)
        rc = cdm_pipeline_end(f.p, res);
    if (rc == 0)
        rc = heartbeat(&f, true);
    if (f.p != NULL)
        res->bytes_in = cdm_pipeline_bytes_in(f.p);
    free(buf);
    cdm_pipeline_free(f.p);
    if (rc < 0) {
        ensure_message(&err, rc, "reading the stream");
        /* The writer may have put its own account of the same failure into CTX already. */
        return cdm_error_take(&ctx->error, &err);
    }
    cdm_clear_error(ctx);
    return 0;
}

/* ---- the push API ------------------------------------------------------------------------- */

struct cdm_stream {
    cdm_ctx *ctx;
    struct cdm_pipeline *p;
    struct cdm_error err;   /* the first failure, given again by every later call */
    bool finished;
};

static int stream_failed(cdm_stream *s, int rc, const char *what)
{
    ensure_message(&s->err, rc, what);
    cdm_clear_error(s->ctx);
    return cdm_error_take(&s->ctx->error, &s->err);
}

int cdm_stream_open(cdm_ctx *ctx, cdm_writer *w, const struct cdm_stream_opts *opts,
                    cdm_stream **out)
{
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);
    *out = NULL;
    struct cdm_stream_opts defaults = {0};
    if (opts == NULL)
        opts = &defaults;
    cdm_stream *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    s->ctx = ctx;
    int rc = cdm_pipeline_new(w, opts, &s->err, &s->p);
    if (rc < 0) {
        rc = stream_failed(s, rc, "starting the stream");
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int cdm_stream_push(cdm_stream *s, const void *buf, size_t len)
{
    if (s->err.rc != 0)
        return stream_failed(s, s->err.rc, "the stream");
    if (s->finished)
        return cdm_set_error(s->ctx, CDM_SIDE_NONE, -EINVAL, "the stream is finished");
    cdm_clear_error(s->ctx);
    int rc = cdm_pipeline_push(s->p, buf, len);
    return rc < 0 ? stream_failed(s, rc, "decoding the stream") : 0;
}

int cdm_stream_finish(cdm_stream *s, struct cdm_stream_result *res)
{
    struct cdm_stream_result local;
    if (res == NULL)
        res = &local;
    memset(res, 0, sizeof *res);
    if (s->err.rc != 0)
        return stream_failed(s, s->err.rc, "the stream");
    if (s->finished)
        return cdm_set_error(s->ctx, CDM_SIDE_NONE, -EINVAL, "the stream is finished");
    cdm_clear_error(s->ctx);
    s->finished = true;
    int rc = cdm_pipeline_end(s->p, res);
    res->bytes_in = cdm_pipeline_bytes_in(s->p);
    return rc < 0 ? stream_failed(s, rc, "ending the stream") : 0;
}

uint64_t cdm_stream_bytes_in(const cdm_stream *s)
{
    return cdm_pipeline_bytes_in(s->p);
}

void cdm_stream_free(cdm_stream *s)
{
    if (s == NULL)
        return;
    cdm_pipeline_free(s->p);
    free(s);
}
