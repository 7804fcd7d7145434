/* convert.c -- QCOW2 to RAW conversion as a job of the worker pool.
 *
 * The producer walks the guest disk: ranges that map to zero or unallocated clusters become
 * hole items (up to 1 GiB, zeroed on the target unless it already reads as zeros); the rest
 * is cut into request-sized items aligned to the request size.  Each worker maps its item
 * through the shared metadata cache into runs, assembles the item's bytes in its buffer --
 * host-contiguous data clusters with one pread each (O_DIRECT when aligned; holes of the
 * image file found with SEEK_DATA are not read); compressed clusters, and plain clusters lying
 * between them, gathered into spans of up to 1 MiB of the image file, each span read with one
 * pread and its clusters decompressed (or copied) into place -- and writes them with the
 * target writer's zero detection; zero and unallocated runs become zeroed ranges.  Compressed
 * clusters are therefore decompressed in parallel across workers.
 * The image is validated by qcow2.c; only the source and target descriptors are used.
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
    struct cdm_target *target;
    int src_fd;
    int src_dfd;
    atomic_bool seek_data;  /* SEEK_DATA works on the source */
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
    return cdm_target_put(e->s->target, e->w, e->w->buf + (e->c_start - e->base), e->c_start,
                          (size_t)len);
}

static int flush_zero(struct emitter *e)
{
    if (e->z_len == 0)
        return 0;
    uint64_t len = e->z_len;
    e->z_len = 0;
    return cdm_target_zero(e->s->target, e->w, e->z_start, len);
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

/* Read LEN bytes at HOST of the image into DST: O_DIRECT when everything is aligned, else
 * buffered, dropping the pages afterwards so the page cache stays small. */
static int read_host(struct conv_state *s, struct cdm_worker *w, uint8_t *dst, uint64_t host,
                     size_t len)
{
    size_t got = 0;
    int rc;
    if (s->src_dfd >= 0 && CDM_IS_ALIGNED(host, CDM_ALIGN) && CDM_IS_ALIGNED(len, CDM_ALIGN) &&
        CDM_IS_ALIGNED((uintptr_t)dst, CDM_ALIGN)) {
        rc = cdm_pread_full(s->src_dfd, dst, len, host, &got);
        if (rc == 0 && got == len) {
            w->stats.direct_read = 1;
            w->stats.bytes_read += len;
            return 0;
        }
        if (rc < 0 && rc != -EINVAL)
            goto fail;
        got = 0;    /* EINVAL or short: retry buffered */
    }
    rc = cdm_pread_full(s->src_fd, dst, len, host, &got);
    if (rc < 0)
        goto fail;
    posix_fadvise(s->src_fd, (off_t)host, (off_t)len, POSIX_FADV_DONTNEED);
    if (got < len)
        return cdm_worker_fail(w, CDM_SIDE_SOURCE, -EIO,
                               "the image ended at host offset 0x%llx while reading %zu bytes at "
                               "0x%llx (did it shrink during the conversion?)",
                               HX(host + got), len, HX(host));
    w->stats.bytes_read += len;
    return 0;
fail:
    return cdm_worker_fail(w, CDM_SIDE_SOURCE, rc, "read of %zu bytes at host offset 0x%llx: %s",
                           len, HX(host), strerror(-rc));
}

/* Emit the data run of LEN bytes at GUEST stored at HOST: holes of the image file are zeros,
 * the rest is read into the buffer. */
static int emit_data(struct emitter *e, uint64_t guest, uint64_t host, uint64_t len)
{
    struct conv_state *s = e->s;
    uint64_t p = host, end = host + len;
    while (p < end) {
        uint64_t ds = p, de = end;
        if (atomic_load(&s->seek_data) && cdm_next_data(s->src_fd, 0, p, end, &ds, &de) < 0) {
            atomic_store(&s->seek_data, false);
            ds = p;
            de = end;
        }
        int rc = 0;
        if (ds > p)
            rc = emit_zero(e, guest + (p - host), ds - p);
        if (rc == 0 && de > ds) {
            uint64_t g = guest + (ds - host);
            rc = read_host(s, e->w, e->w->buf + (g - e->base), ds, (size_t)(de - ds));
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
 * together in the image file, read with one pread into the worker's scratch buffer and then
 * decompressed or copied out one by one.  qemu-img writes compressed clusters back to back,
 * so an item's clusters usually come in one or two reads instead of one each. */
#define SPAN_RUNS 256u              /* members per span */
#define SPAN_BYTES (1u << 20)       /* bytes read per span, before alignment slack */
#define SPAN_DIRECT_MIN (64u << 10) /* smaller spans are read through the page cache */
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
        return cdm_worker_fail(w, CDM_SIDE_NONE, -EAGAIN, "no free decompressor");
    char err[CDM_ERRMSG_MAX];
    int rc = qcow2_decompress(&s->img, d, in, (size_t)r->csize, out, (size_t)cs,
                              r->cluster_guest, err);
    qcow2_decoder_put(&s->decoders, d);
    if (rc < 0)
        return cdm_worker_fail(w, CDM_SIDE_SOURCE, rc, "%s", err);
    if (!direct)
        memcpy(w->buf + (r->guest_off - e->base), out + (r->guest_off - r->cluster_guest),
               (size_t)r->length);
    return emit_content(e, r->guest_off, r->length);
}

/* Read span SP in one go (O_DIRECT when possible) and emit its members in order. */
static int flush_span(struct emitter *e, struct span *sp)
{
    if (sp->n == 0)
        return 0;
    struct conv_state *s = e->s;
    struct cdm_worker *w = e->w;
    unsigned n = sp->n;
    sp->n = 0;
    /* Large spans are read with O_DIRECT, widened to 4 KiB alignment; small ones (a few
     * compressed clusters between zero runs) read just their bytes through the page cache,
     * where neighbouring spans find the blocks they share. */
    bool direct = s->src_dfd >= 0 && sp->host_hi - sp->host_lo >= SPAN_DIRECT_MIN;
    uint64_t lo = direct ? CDM_ALIGN_DOWN(sp->host_lo, CDM_ALIGN) : sp->host_lo;
    uint64_t hi = direct ? CDM_ALIGN_UP(sp->host_hi, CDM_ALIGN) : sp->host_hi;
    uint64_t need = sp->host_hi - lo;       /* bytes that must arrive; HI may pass the end */
    size_t got = 0;
    int rc = -EINVAL;
    if (direct) {
        rc = cdm_pread_full(s->src_dfd, w->scratch, (size_t)(hi - lo), lo, &got);
        if (rc == 0 || got >= need)
            w->stats.direct_read = 1;
        else if (rc != -EINVAL)
            goto fail;
    }
    if (got < need) {
        /* No O_DIRECT twin, EINVAL (alignment the filesystem refuses), or a short read at
         * an unaligned end of file: read the rest buffered. */
        got = CDM_ALIGN_DOWN(got, CDM_ALIGN);
        size_t more = 0;
        rc = cdm_pread_full(s->src_fd, w->scratch + got, (size_t)(need - got), lo + got, &more);
        if (rc < 0)
            goto fail;
        got += more;
        if (got < need)
            return cdm_worker_fail(w, CDM_SIDE_SOURCE, -EIO,
                                   "the image ended at host offset 0x%llx while reading "
                                   "clusters at 0x%llx (did it shrink during the conversion?)",
                                   HX(lo + got), HX(sp->host_lo));
    }
    w->stats.bytes_read += got;
    rc = 0;
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
fail:
    return cdm_worker_fail(w, CDM_SIDE_SOURCE, rc, "read of %llu bytes at host offset 0x%llx: %s",
                           HX(hi - lo), HX(lo), strerror(-rc));
}

static int conv_work(struct cdm_worker *w, const struct cdm_item *item)
{
    struct conv_state *s = w->job->state;
    if (item->kind == CDM_ITEM_HOLE)
        return cdm_target_zero(s->target, w, item->offset, item->length);

    struct emitter e = {.s = s, .w = w, .base = item->offset};
    struct span sp;
    sp.n = 0;
    uint64_t pos = item->offset, end = item->offset + item->length;
    uint64_t pg = 0, ph = 0, pl = 0;   /* pending data read: guest, host, length */
    char err[CDM_ERRMSG_MAX];
    int rc = 0;
    while (pos < end && rc == 0) {
        struct qcow2_run run;
        rc = qcow2_map(&s->cache, pos, end - pos, &run, err);
        if (rc < 0)
            return cdm_worker_fail(w, CDM_SIDE_SOURCE, rc, "%s", err);
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
    char err[CDM_ERRMSG_MAX];
    for (unsigned probes = 0; probes < HOLE_PROBES && hole_end < s->size &&
                              hole_end - s->pos < CDM_HOLE_CHUNK;
         probes++) {
        struct qcow2_run run;
        int rc = qcow2_map(&s->cache, hole_end, CDM_HOLE_CHUNK - (hole_end - s->pos), &run, err);
        if (rc < 0)
            return cdm_job_fail(job, CDM_SIDE_SOURCE, rc, "%s", err);
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

/* Refuse what must not or cannot be converted; 0 when IMG may be converted. */
static int refuse(cdm_ctx *ctx, const struct qcow2_image *img)
{
    const struct cdm_qcow2_info *i = &img->info;
    if (i->has_backing)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EUNSAFE,
                             "the image has a backing file \"%s\"; backing files are never "
                             "opened",
                             i->backing_name);
    if (i->has_data_file)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EUNSAFE,
                             "the image keeps its data in an external data file \"%s\"; data "
                             "files are never opened",
                             i->data_file_name);
    if (i->crypt_method != CDM_QCOW2_CRYPT_NONE)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EUNSUPPORTED,
                             "the image is encrypted (method %u: %s); encrypted images are not "
                             "supported",
                             i->crypt_method,
                             i->crypt_method == CDM_QCOW2_CRYPT_AES    ? "AES"
                             : i->crypt_method == CDM_QCOW2_CRYPT_LUKS ? "LUKS"
                                                                      : "unknown");
    if (i->corrupt)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                             "the image is marked corrupt (incompatible feature bit 1); repair "
                             "it with qemu-img check -r all");
    if (!i->compression_supported)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EUNSUPPORTED,
                             "compression type %u (%s) is not supported by this build",
                             i->compression_type,
                             i->compression_type == CDM_QCOW2_COMPRESSION_ZSTD ? "zstd"
                                                                               : "unknown");
    return 0;
}

/* Convert the QCOW2 image SRC_FD to RAW on DST_FD (offset 0), keeping the target sparse and
 * finishing with fdatasync.  OPTS->size must be the virtual size (from cdm_qcow2_inspect);
 * OPTS supplies the O_DIRECT twins, request and sparse sizes, threads, flags and the target's
 * sector size and the preallocation mode (scan_method and map_fd are ignored).
 * STATS (zeroed by the caller) receives counters, scan_method CDM_SCAN_QCOW2.  0, -errno,
 * -CDM_EFORMAT (malformed image or corrupt bit), -CDM_EUNSUPPORTED (encryption, compression
 * type), -CDM_EUNSAFE (backing or external data file) or -CDM_ECANCELED; the message and the
 * endpoint concerned are in CTX. */
int cdm_qcow2_convert(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
                      struct cdm_copy_stats *stats)
{
    char err[CDM_ERRMSG_MAX];
    cdm_clear_error(ctx);
    atomic_store(&ctx->cancel, 0);

    uint32_t request, sparse;
    int rc = cdm_check_copy_opts(ctx, opts, &request, &sparse);
    if (rc < 0)
        return rc;

    struct conv_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    rc = qcow2_open(&s->img, src_fd, err);
    if (rc < 0) {
        free(s);
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, rc, "%s", err);
    }
    rc = refuse(ctx, &s->img);
    if (rc == 0 && opts->size != s->img.virtual_size)
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                           "size %llu was given for an image whose virtual size is %llu",
                           HX(opts->size), HX(s->img.virtual_size));
    if (rc < 0) {
        free(s);
        return rc;
    }
    rc = qcow2_cache_init(&s->cache, &s->img);
    if (rc < 0) {
        free(s);
        return cdm_set_error(ctx, CDM_SIDE_NONE, rc, "cannot allocate the metadata cache");
    }
    qcow2_decoders_init(&s->decoders);
    s->src_fd = src_fd;
    s->src_dfd = opts->src_direct_fd;
    atomic_init(&s->seek_data, true);
    s->size = s->img.virtual_size;
    /* Items hold whole clusters: at least one cluster, a multiple of the cluster size. */
    s->request = CDM_ALIGN_UP(CDM_MAX(request, s->img.cluster_size), s->img.cluster_size);

    struct cdm_target t;
    rc = cdm_target_init(&t, dst_fd, opts->dst_direct_fd, opts->target_is_blockdev != 0,
                         opts->target_sector, sparse,
                         (opts->flags & CDM_COPY_TARGET_IS_ZERO) != 0,
                         (opts->flags & CDM_COPY_NO_ZERO_DETECT) == 0, CDM_ZP_SPARSE);
    if (rc < 0) {
        rc = cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "cannot set up the target: %s",
                           strerror(-rc));
        goto out;
    }
    s->target = &t;
    if (opts->preallocation != CDM_PREALLOC_OFF) {
        char why[CDM_ERRMSG_MAX] = "";
        rc = cdm_prealloc_prepare(&t, opts->preallocation, s->size, stats, why, sizeof why);
        if (rc < 0) {
            rc = cdm_set_error(ctx, CDM_SIDE_TARGET, rc, "%s", why);
            cdm_target_fini(&t);
            goto out;
        }
    }

    struct cdm_job job;
    memset(&job, 0, sizeof job);
    job.ctx = ctx;
    job.state = s;
    job.next = conv_next;
    job.work = conv_work;
    job.buf_size = (size_t)s->request;
    job.scratch_size = span_capacity(s->img.cluster_size) + (size_t)s->img.cluster_size;
    job.nthreads = opts->threads;
    job.total = s->size;

    stats->scan_method = CDM_SCAN_QCOW2;
    rc = cdm_job_run(&job, stats);
    if (opts->preallocation != CDM_PREALLOC_OFF)
        cdm_prealloc_account(stats);
    rc = cdm_finish_target(ctx, &t, opts, rc);
    cdm_target_fini(&t);
out:
    qcow2_decoders_fini(&s->decoders);
    qcow2_cache_fini(&s->cache);
    free(s);
    return rc;
}
