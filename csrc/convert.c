/* convert.c -- QCOW2 to RAW conversion, a producer of the job driver.
 *
 * The producer walks the guest disk: ranges that map to zero or unallocated clusters become
 * hole items (up to 1 GiB, zeroed on the target unless it already reads as zeros); the rest
 * is cut into request-sized items aligned to the request size.  Each worker maps its item
 * through the shared metadata cache into runs, assembles the item's bytes in its buffer --
 * host-contiguous data clusters with one read each (holes of the image file found with the
 * reader's extent map are not read); compressed clusters, and plain clusters lying between
 * them, gathered into spans of up to 1 MiB of the image file, each span read at once and its
 * clusters decompressed (or copied) into place -- and writes them with the target writer's
 * zero detection; zero and unallocated runs become zeroed ranges.  Compressed clusters are
 * therefore decompressed in parallel across workers.
 * The image is validated by qcow2.c and every byte of it comes through a struct cdm_reader.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2.h"

#define HOLE_PROBES 64u     /* map calls per hole item, to keep the job lock short */
#define HX(v) ((unsigned long long)(v))

struct conv_state {
    struct qcow2_image img;
    struct qcow2_cache cache;
    struct qcow2_decoders decoders;
    struct cdm_reader *src;
    atomic_bool seek_data;  /* the reader's extent map works on the image file */
    uint64_t size;
    uint64_t request;
    uint64_t pos;           /* producer cursor, guarded by the job lock */
};

/* The bytes of one item being assembled in the worker's buffer: a pending run of content
 * (already in the buffer) and a pending run of zeros, flushed when the other kind starts. */
struct emitter {
    struct conv_state *s;
    struct cdm_worker *w;
    uint64_t base;          /* guest offset of w->buf[0] */
    uint64_t c_start, c_len;
    uint64_t z_start, z_len;
};

static int flush_content(struct emitter *e)
{
    if (e->c_len == 0)
        return 0;
    uint64_t len = e->c_len;
    e->c_len = 0;
    return cdm_target_put(e->w->job->target, &e->w->io, e->w->buf + (e->c_start - e->base),
                          e->c_start, (size_t)len);
}

static int flush_zero(struct emitter *e)
{
    if (e->z_len == 0)
        return 0;
    uint64_t len = e->z_len;
    e->z_len = 0;
    return cdm_target_zero(e->w->job->target, &e->w->io, e->z_start, len);
}

static int emit_zero(struct emitter *e, uint64_t guest, uint64_t len)
{
    int rc = flush_content(e);
    if (rc < 0)
        return rc;
    if (e->z_len > 0 && e->z_start + e->z_len == guest) {
        e->z_len += len;
        return 0;
    }
    rc = flush_zero(e);
    e->z_start = guest;
    e->z_len = len;
    return rc;
}

static int emit_content(struct emitter *e, uint64_t guest, uint64_t len)
{
    int rc = flush_zero(e);
    if (rc < 0)
        return rc;
    if (e->c_len > 0 && e->c_start + e->c_len == guest) {
        e->c_len += len;
        return 0;
    }
    rc = flush_content(e);
    e->c_start = guest;
    e->c_len = len;
    return rc;
}

/* Emit the data run of LEN bytes at GUEST stored at HOST: holes of the image file are zeros,
 * the rest is read into the buffer. */
static int emit_data(struct emitter *e, uint64_t guest, uint64_t host, uint64_t len)
{
    struct conv_state *s = e->s;
    uint64_t p = host, end = host + len;
    while (p < end) {
        uint64_t ds = p, de = end;
        /* Holes of the image file read as zeros; a reader whose map fails is read whole. */
        if (atomic_load(&s->seek_data) && s->src->ops->next_data != NULL &&
            s->src->ops->next_data(s->src, p, end, &ds, &de) < 0) {
            atomic_store(&s->seek_data, false);
            ds = p;
            de = end;
        }
        int rc = 0;
        if (ds > p)
            rc = emit_zero(e, guest + (p - host), ds - p);
        if (rc == 0 && de > ds) {
            uint64_t g = guest + (ds - host);
            rc = cdm_read(s->src, e->w->buf + (g - e->base), (size_t)(de - ds), ds, 0,
                          &e->w->io);
            if (rc == 0)
                rc = emit_content(e, g, de - ds);
        }
        if (rc < 0)
            return rc;
        p = de;
    }
    return 0;
}

/* A span: compressed clusters (and the plain data clusters between them) that lie close
 * together in the image file, read at once into the worker's scratch buffer and then
 * decompressed or copied out one by one.  qemu-img writes compressed clusters back to back,
 * so an item's clusters usually come in one or two reads instead of one each. */
#define SPAN_RUNS 256u              /* members per span */
#define SPAN_BYTES (1u << 20)       /* bytes read per span, before alignment slack */
#define SPAN_GAP (64u << 10)        /* unrelated bytes read between members: at most this, */
                                    /* and at most one cluster */

struct span {
    unsigned n;
    uint64_t host_lo;               /* lowest host offset of a member */
    uint64_t host_hi;               /* highest end of a member */
    struct qcow2_run runs[SPAN_RUNS];   /* in guest order */
};

/* Bytes of the scratch buffer that hold a span: room for SPAN_BYTES or one compressed cluster
 * (at most two clusters of input), plus alignment slack at both ends. */
static size_t span_capacity(uint64_t cluster_size)
{
    return (size_t)CDM_ALIGN_UP(CDM_MAX((uint64_t)SPAN_BYTES, 2 * cluster_size), CDM_ALIGN) +
           2 * CDM_ALIGN;
}

static uint64_t member_bytes(const struct qcow2_run *r)
{
    return r->kind == QCOW2_COMPRESSED ? r->csize : r->length;
}

/* Whether R may join SP: it lies within SPAN_GAP of the span's bytes and the span still fits
 * the scratch buffer.  Members need not come in host order: qemu packs compressed clusters
 * into a partly used host cluster while plain clusters take the next free ones, so a
 * compressed cluster often sits before the plain cluster that precedes it in the guest. */
static bool span_fits(const struct conv_state *s, const struct span *sp, const struct qcow2_run *r)
{
    uint64_t h = r->host_off, end = h + member_bytes(r);
    if (sp->n == 0)
        return true;
    uint64_t gap = CDM_MIN((uint64_t)SPAN_GAP, s->img.cluster_size);
    if (sp->n >= SPAN_RUNS || h > sp->host_hi + gap || end + gap < sp->host_lo)
        return false;
    uint64_t lo = CDM_MIN(sp->host_lo, h), hi = CDM_MAX(sp->host_hi, end);
    return CDM_ALIGN_UP(hi, CDM_ALIGN) - CDM_ALIGN_DOWN(lo, CDM_ALIGN) <=
           span_capacity(s->img.cluster_size);
}

static void span_add(struct span *sp, const struct qcow2_run *r)
{
    uint64_t end = r->host_off + member_bytes(r);
    if (sp->n == 0) {
        sp->host_lo = r->host_off;
        sp->host_hi = end;
    } else {
        sp->host_lo = CDM_MIN(sp->host_lo, r->host_off);
        sp->host_hi = CDM_MAX(sp->host_hi, end);
    }
    sp->runs[sp->n++] = *r;
}

/* Decompress the compressed cluster of run R, whose compressed bytes are at IN, into the
 * item buffer (or the scratch tail when the run does not start the cluster or the cluster
 * does not end inside the item). */
static int emit_compressed(struct emitter *e, const struct qcow2_run *r, const uint8_t *in)
{
    struct conv_state *s = e->s;
    struct cdm_worker *w = e->w;
    uint64_t cs = s->img.cluster_size;
    bool direct = r->guest_off == r->cluster_guest &&
                  r->cluster_guest + cs <= e->base + s->request;
    uint8_t *out = direct ? w->buf + (r->cluster_guest - e->base)
                          : w->scratch + span_capacity(cs);
    struct qcow2_decoder *d = qcow2_decoder_get(&s->decoders);
    if (d == NULL)
        return cdm_error_set(&w->io.error, CDM_SIDE_NONE, -EAGAIN, "no free decompressor");
    int rc = qcow2_decompress(&s->img, d, in, (size_t)r->csize, out, (size_t)cs,
                              r->cluster_guest, NULL, &w->io.error);
    qcow2_decoder_put(&s->decoders, d);
    if (rc < 0)
        return rc;
    if (!direct)
        memcpy(w->buf + (r->guest_off - e->base), out + (r->guest_off - r->cluster_guest),
               (size_t)r->length);
    return emit_content(e, r->guest_off, r->length);
}

/* Read span SP in one go and emit its members in order: with O_DIRECT where the reader has
 * it, widened to 4 KiB alignment (the scratch buffer has the room), however small the span
 * (through the page cache, the blocks it shares with its neighbours and the readahead, 8 MiB
 * on some disks, would stay charged to the job's memory); otherwise just the span's bytes
 * through the page cache. */
static int flush_span(struct emitter *e, struct span *sp)
{
    if (sp->n == 0)
        return 0;
    struct conv_state *s = e->s;
    struct cdm_worker *w = e->w;
    unsigned n = sp->n;
    sp->n = 0;
    bool direct = s->src->pref_size != 0;
    uint64_t lo = direct ? CDM_ALIGN_DOWN(sp->host_lo, CDM_ALIGN) : sp->host_lo;
    int rc = cdm_read(s->src, w->scratch, (size_t)(sp->host_hi - lo), lo,
                      direct ? CDM_READ_ROOM : CDM_READ_CACHED, &w->io);
    for (unsigned i = 0; i < n && rc >= 0; i++) {
        const struct qcow2_run *r = &sp->runs[i];
        const uint8_t *in = w->scratch + (r->host_off - lo);
        if (r->kind == QCOW2_COMPRESSED) {
            rc = emit_compressed(e, r, in);
        } else {
            memcpy(w->buf + (r->guest_off - e->base), in, (size_t)r->length);
            rc = emit_content(e, r->guest_off, r->length);
        }
    }
    return rc < 0 ? rc : 0;
}

static int conv_work(struct cdm_worker *w, const struct cdm_item *item)
{
    struct conv_state *s = w->job->state;
    if (item->kind == CDM_ITEM_HOLE)
        return cdm_target_zero(w->job->target, &w->io, item->offset, item->length);

    struct emitter e = {.s = s, .w = w, .base = item->offset};
    struct span sp;
    sp.n = 0;
    uint64_t pos = item->offset, end = item->offset + item->length;
    uint64_t pg = 0, ph = 0, pl = 0;   /* pending data read: guest, host, length */
    int rc = 0;
    while (pos < end && rc == 0) {
        struct qcow2_run run;
        rc = qcow2_map(&s->cache, pos, end - pos, &run, &w->io.error);
        if (rc < 0)
            return rc;
        pos = run.guest_off + run.length;
        if (run.kind == QCOW2_COMPRESSED || (run.kind == QCOW2_DATA && sp.n > 0)) {
            /* Compressed clusters gather into spans, and plain clusters close behind them
             * join in; anything else closes the span. */
            if (span_fits(s, &sp, &run)) {
                if (pl > 0)
                    rc = emit_data(&e, pg, ph, pl);
                pl = 0;
                span_add(&sp, &run);
                continue;
            }
            rc = flush_span(&e, &sp);
            if (rc == 0 && run.kind == QCOW2_COMPRESSED) {
                span_add(&sp, &run);
                continue;
            }
        } else {
            rc = flush_span(&e, &sp);
        }
        if (rc < 0)
            break;
        if (run.kind == QCOW2_DATA && pl > 0 && pg + pl == run.guest_off &&
            ph + pl == run.host_off) {
            pl += run.length;           /* host-contiguous with the pending read */
            continue;
        }
        if (pl > 0)
            rc = emit_data(&e, pg, ph, pl);
        pl = 0;
        if (rc < 0)
            break;
        if (run.kind == QCOW2_DATA) {
            pg = run.guest_off;
            ph = run.host_off;
            pl = run.length;
        } else {                        /* ZERO, UNALLOCATED */
            rc = emit_zero(&e, run.guest_off, run.length);
        }
    }
    if (rc == 0)
        rc = flush_span(&e, &sp);
    if (rc == 0 && pl > 0)
        rc = emit_data(&e, pg, ph, pl);
    if (rc == 0)
        rc = flush_content(&e);
    if (rc == 0)
        rc = flush_zero(&e);
    return rc;
}

static int conv_next(struct cdm_job *job, struct cdm_item *item)
{
    struct conv_state *s = job->state;
    if (s->pos >= s->size)
        return 0;
    memset(item, 0, sizeof *item);

    /* Zero and unallocated runs from here become one hole item. */
    uint64_t hole_end = s->pos;
    struct cdm_error err = {0};
    for (unsigned probes = 0; probes < HOLE_PROBES && hole_end < s->size &&
                              hole_end - s->pos < CDM_HOLE_CHUNK;
         probes++) {
        struct qcow2_run run;
        int rc = qcow2_map(&s->cache, hole_end, CDM_HOLE_CHUNK - (hole_end - s->pos), &run,
                           &err);
        if (rc < 0)
            return cdm_job_fail(job, CDM_SIDE_SOURCE, rc, "%s", err.msg);
        if (run.kind == QCOW2_DATA || run.kind == QCOW2_COMPRESSED)
            break;
        hole_end += run.length;
    }
    if (hole_end < s->size)     /* let the next item start on a cluster boundary */
        hole_end = CDM_MAX(s->pos, CDM_ALIGN_DOWN(hole_end, s->img.cluster_size));
    if (hole_end > s->pos) {
        item->kind = CDM_ITEM_HOLE;
        item->offset = s->pos;
        item->length = hole_end - s->pos;
    } else {
        item->kind = CDM_ITEM_CUSTOM;
        item->offset = s->pos;
        item->length = CDM_MIN(s->size, CDM_ALIGN_DOWN(s->pos, s->request) + s->request) - s->pos;
    }
    s->pos += item->length;
    return 1;
}

/* Open the image of SRC into S, refuse what must not be converted, check OPTS->size and set
 * up the metadata cache.  0 or -errno/-CDM_E* (message in CTX); on failure nothing is left
 * to release. */
static int conv_open(cdm_ctx *ctx, struct conv_state *s, struct cdm_reader *src,
                     const struct cdm_copy_opts *opts, uint32_t request)
{
    int rc = qcow2_open(&s->img, src, &ctx->error);
    if (rc < 0)
        return rc;
    rc = qcow2_refuse(&s->img, &ctx->error);
    if (rc == 0 && opts->size != s->img.virtual_size)
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                           "size %llu was given for an image whose virtual size is %llu",
                           HX(opts->size), HX(s->img.virtual_size));
    if (rc < 0)
        return rc;
    rc = qcow2_cache_init(&s->cache, &s->img);
    if (rc < 0)
        return cdm_set_error(ctx, CDM_SIDE_NONE, rc, "cannot allocate the metadata cache");
    qcow2_decoders_init(&s->decoders);
    s->src = src;
    atomic_init(&s->seek_data, true);
    s->size = s->img.virtual_size;
    /* Items hold whole clusters: at least one cluster, a multiple of the cluster size. */
    s->request = CDM_ALIGN_UP(CDM_MAX(request, s->img.cluster_size), s->img.cluster_size);
    return 0;
}

/* Convert the QCOW2 image SRC_FD to RAW on DST_FD (offset 0), keeping the target sparse and
 * finishing with fdatasync.  OPTS->size must be the virtual size (from cdm_qcow2_inspect);
 * OPTS supplies the O_DIRECT twins, request and sparse sizes, threads, flags and the target's
 * sector size and the preallocation mode (scan_method and map_fd are ignored).
 * STATS (zeroed by the caller) receives counters, scan_method CDM_SCAN_QCOW2.  0, -errno
 * (-EIO when the image ended early or changed size during the conversion), -CDM_EFORMAT
 * (malformed image or corrupt bit), -CDM_EUNSUPPORTED (encryption, compression type),
 * -CDM_EUNSAFE (backing or external data file) or -CDM_ECANCELED; the message and the
 * endpoint concerned are in CTX. */
int cdm_qcow2_convert(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
                      struct cdm_copy_stats *stats)
{
    uint32_t request, sparse;
    int rc = cdm_job_begin(ctx, opts, &request, &sparse);
    if (rc < 0)
        return rc;
    struct cdm_file_reader fr;
    rc = cdm_file_reader_init(&fr, src_fd, opts->src_direct_fd, src_fd, 0, &ctx->error);
    if (rc < 0)
        return rc;
    return cdm_qcow2_convert_reader(ctx, &fr.r, dst_fd, opts, stats);
}

/* The conversion from any reader SRC (OPTS checked by cdm_job_begin). */
int cdm_qcow2_convert_reader(cdm_ctx *ctx, struct cdm_reader *src, int dst_fd,
                             const struct cdm_copy_opts *opts, struct cdm_copy_stats *stats)
{
    uint32_t request = opts->request_size ? opts->request_size : CDM_DEFAULT_REQUEST;
    struct conv_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    int rc = conv_open(ctx, s, src, opts, request);
    if (rc < 0) {
        free(s);
        return rc;
    }
    struct cdm_producer p = {
        .state = s,
        .next = conv_next,
        .work = conv_work,
        .buf_size = (size_t)s->request,
        .scratch_size = span_capacity(s->img.cluster_size) + (size_t)s->img.cluster_size,
        .scan_method = CDM_SCAN_QCOW2,
    };
    rc = cdm_job_drive(ctx, src, dst_fd, opts, &p, stats);
    qcow2_decoders_fini(&s->decoders);
    qcow2_cache_fini(&s->cache);
    free(s);
    return rc;
}
