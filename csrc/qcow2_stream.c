/* qcow2_stream.c -- the streaming QCOW2 converter: a QCOW2 image that arrives as a
 * forward-only byte stream (an HTTP body without ranges, a decompressor's output) is converted
 * onto a writer in one pass, holding a bounded amount of it.
 *
 * Phase 1.  The bytes from offset 0 are buffered until the header cluster, the snapshot table
 * (when the image has one) and the L1 table are complete, and the refcount table too when it
 * lies within the memory limit.  The header is validated by qcow2_open over an in-memory
 * reader of the buffered bytes whose size is 2^56 (the stream length is unknown, and no
 * offset an entry can hold reaches further): a read past the buffered bytes makes the reader
 * note how far the header needs, and the open is retried once that many bytes are buffered
 * (the target grows geometrically, so a long snapshot table costs a few retries, not one per
 * entry).  When the stream ends during phase 1, the open runs once more with the real size.
 * Truncation is otherwise found at the end: every referenced host byte must have arrived.
 * The same refusals as the random-access converter apply (qcow2_refuse).
 *
 * Phase 2.  The buffered bytes are replayed and the rest of the stream follows, one host
 * cluster at a time, in host order.  What a host cluster is comes from what was parsed
 * before it arrives:
 *   - L2 tables, from the L1 entries (a sorted array): parsed on arrival.  A zero or
 *     unallocated entry (or subcluster) is zeroed on the spot, unless the target already reads
 *     as zeros: each guest cluster has exactly one L2 entry, so no later write overlaps it and
 *     no bitmap of written clusters is needed.  An entry naming a host cluster ahead is
 *     remembered in a min-heap keyed by host offset; one naming a cluster already passed is
 *     served from the clusters held (below), or fails.
 *   - data clusters and compressed byte ranges, from the heap: written to their guest offsets
 *     (only the allocated subclusters with extended L2 entries) as they arrive; a compressed
 *     range is decompressed by qcow2_decompress as soon as its last byte arrived (a range that
 *     runs on into the next clusters is copied aside until then).
 *   - the metadata regions of the header, the refcount blocks listed in the refcount table,
 *     and clusters that only preallocate zero entries: dropped.  Data claiming any of them,
 *     or a host cluster claimed twice, is -CDM_EFORMAT.
 *   - anything else may be data whose L2 table comes later: it is held (copied) unless it is
 *     all zeros (then only its offset is kept) or, in a cluster of compressed data, every
 *     non-zero byte belongs to the compressed data already known (exact extents: the
 *     decompressor reports the bytes it took).  A held cluster is freed when an L2 entry takes
 *     it, or when the compressed ranges read from it have taken its last unknown byte.
 * An entry naming a host cluster that was passed and not held fails with a clear message: the
 * converter never writes bytes it did not keep.
 *
 * Memory.  The counted memory -- the phase-1 buffer, the clusters held, the compressed ranges
 * copied aside, the heap of references ahead and the index of held clusters -- stays within
 * MEM_LIMIT (64 MiB by default) or the conversion fails naming the offset and the limit; its
 * most is reported as peak_held.  Besides it: four cluster buffers (at most 8 MiB), the stage
 * that gathers guest-contiguous data into large writes (4 MiB), the array of L2 tables (16
 * bytes per used L1 entry) and of refcount blocks (8 bytes per refcount table entry), both
 * derived from tables that had to fit in the first MEM_LIMIT bytes.
 * Nothing is allocated per guest cluster.  End: every L2 table and every referenced host byte
 * must have arrived ("the image ended at offset X, before ..."), else -EIO.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "stream.h"

#define DEFAULT_MEM_LIMIT (64ull << 20)
#define STAGE_BYTES (4u << 20)              /* guest-contiguous data written at once */
#define FAKE_SIZE QCOW2_MAX_VIRTUAL_SIZE    /* file size bound while the length is unknown */
#define REFTABLE_OFFSET_MASK 0xfffffffffffffe00ull
#define ALL_SUBCLUSTERS 0xffffffffu
#define HX(v) ((unsigned long long)(v))
#define MIB(v) ((unsigned long long)((v) >> 20))

/* Record a failure of the image in ERR, first one winning; returns its code. */
#define fail(s, rc, ...) cdm_error_set((s)->err, CDM_SIDE_SOURCE, (rc), __VA_ARGS__)

enum ref_kind {
    REF_DATA = 0,           /* a data cluster: X is the bitmap of allocated subclusters */
    REF_COMPRESSED = 1,     /* compressed bytes: X is their length */
    REF_SKIP = 2            /* a host cluster preallocated for a zero entry: never read */
};

/* A host range named by an L2 entry already parsed, ahead of the stream. */
struct ref {
    uint64_t host;          /* DATA, SKIP: host cluster; COMPRESSED: first byte */
    uint64_t guest;         /* guest cluster */
    uint32_t x;
    uint32_t kind;          /* enum ref_kind */
};

/* A compressed range that started in a cluster already passed: its bytes so far. */
struct span {
    uint64_t host;
    uint64_t guest;
    uint32_t csize;
    uint32_t filled;
    uint8_t *buf;
};

/* A host cluster that arrived without a known role. */
struct held {
    uint64_t host;
    uint8_t *buf;           /* the cluster, or NULL when it is all zeros */
    uint32_t todo_lo;       /* its unknown non-zero bytes lie in [todo_lo, todo_hi) */
    uint32_t todo_hi;
    bool claimed;           /* compressed data was read from it */
    bool dead;              /* freed; removed at the next compaction */
};

struct l2_table {
    uint64_t host;
    uint64_t l1_index;
};

/* The in-memory reader qcow2_open validates the buffered header through. */
struct mem_reader {
    struct cdm_reader r;
    const uint8_t *buf;
    uint64_t have;
    uint64_t need;          /* the most bytes a read asked for */
};

struct qstream {
    struct cdm_sink sink;
    cdm_writer *w;
    struct cdm_error *err;
    uint64_t limit;
    int rc;                 /* the first failure: every later call returns it */
    bool ended;             /* end() was called */
    bool known_zero;
    /* phase 1 */
    uint8_t *p1;
    uint64_t p1_len, p1_cap;
    uint64_t want;          /* try to open (again) once this many bytes are buffered */
    uint64_t need;          /* bytes that must be buffered */
    bool opened, ready;
    struct mem_reader mr;
    struct qcow2_image img;
    struct qcow2_decoders decoders;
    struct qcow2_decoder *dec;
    /* phase 2 */
    uint64_t cs;
    uint8_t *cur, *out, *gather;
    uint64_t cur_host;      /* host offset of cur[0] */
    uint64_t cur_len;
    struct l2_table *l2;
    size_t n_l2, l2_next;
    uint64_t *refblocks;
    size_t n_refblocks;
    struct ref *heap;
    size_t n_heap, cap_heap;
    struct held *held;
    size_t n_held, cap_held, n_dead;
    struct span *spans;
    size_t n_spans, cap_spans;
    uint64_t zero_off, zero_len;    /* guest zeros not yet issued */
    uint8_t *stage;                 /* STAGE_BYTES, aligned: guest data not yet written */
    uint64_t stage_off;             /* guest offset of stage[0] */
    size_t stage_len;
    uint64_t used, peak;            /* counted memory */
};

/* ---- counted memory -------------------------------------------------------------------- */

/* Count N more bytes, failing when the limit would be passed: "SUBJECT at host offset HOST
 * PREDICATE; more than ... would have to be held". */
static int take(struct qstream *s, uint64_t n, const char *subject, uint64_t host,
                const char *predicate)
{
    if (n > s->limit || s->used > s->limit - n) {
        bool mib = CDM_IS_ALIGNED(s->limit, 1u << 20);
        return fail(s, -CDM_EUNSUPPORTED,
                    "%s at host offset 0x%llx %s; more than %llu %s would have to be held (the "
                    "memory limit)",
                    subject, HX(host), predicate, mib ? MIB(s->limit) : HX(s->limit),
                    mib ? "MiB" : "bytes");
    }
    s->used += n;
    s->peak = CDM_MAX(s->peak, s->used);
    return 0;
}

static void give(struct qstream *s, uint64_t n)
{
    s->used -= n;
}

/* Grow the array *P of *CAP elements of SIZE bytes to hold one more, counting it. */
static int grow(struct qstream *s, void **p, size_t *cap, size_t n, size_t size,
                const char *subject, uint64_t host, const char *predicate)
{
    if (n < *cap)
        return 0;
    size_t ncap = *cap ? *cap * 2 : 64;
    int rc = take(s, (uint64_t)(ncap - *cap) * size, subject, host, predicate);
    if (rc < 0)
        return rc;
    void *np = realloc(*p, ncap * size);
    if (np == NULL) {
        give(s, (uint64_t)(ncap - *cap) * size);
        return fail(s, -ENOMEM, "out of memory");
    }
    *p = np;
    *cap = ncap;
    return 0;
}

/* ---- the writer -------------------------------------------------------------------------- */

static int writer_failed(struct qstream *s, int rc)
{
    int r = cdm_error_take(s->err, &s->w->io.error);
    if (r < 0)
        return r;
    return cdm_error_set(s->err, CDM_SIDE_TARGET, rc, "%s", s->w->ctx->error.msg);
}

static int flush_zero(struct qstream *s)
{
    if (s->zero_len == 0)
        return 0;
    int rc = cdm_writer_zero(s->w, s->zero_off, s->zero_len);
    s->zero_len = 0;
    return rc < 0 ? writer_failed(s, rc) : 0;
}

/* The guest range [OFF, OFF+LEN) (clipped to the virtual size) reads as zeros. */
static int zero_guest(struct qstream *s, uint64_t off, uint64_t len)
{
    if (off >= s->img.virtual_size || s->known_zero)
        return 0;
    len = CDM_MIN(len, s->img.virtual_size - off);
    if (s->zero_len > 0 && s->zero_off + s->zero_len == off) {
        s->zero_len += len;
        return 0;
    }
    int rc = flush_zero(s);
    s->zero_off = off;
    s->zero_len = len;
    return rc;
}

/* Write the staged guest data. */
static int flush_stage(struct qstream *s)
{
    if (s->stage_len == 0)
        return 0;
    int rc = cdm_writer_put(s->w, s->stage, s->stage_len, s->stage_off);
    s->stage_len = 0;
    return rc < 0 ? writer_failed(s, rc) : 0;
}

/* Write the guest range [OFF, OFF+LEN) from BUF: runs that continue one another are staged
 * and go to the writer in pieces of up to STAGE_BYTES (a cluster at a time would be one small
 * request each). */
static int put_guest(struct qstream *s, const uint8_t *buf, uint64_t off, size_t len)
{
    if (s->stage_len > 0 && s->stage_off + s->stage_len != off) {
        int rc = flush_stage(s);
        if (rc < 0)
            return rc;
    }
    while (len > 0) {
        if (s->stage_len == 0)
            s->stage_off = off;
        size_t n = CDM_MIN(len, STAGE_BYTES - s->stage_len);
        memcpy(s->stage + s->stage_len, buf, n);
        s->stage_len += n;
        buf += n;
        off += n;
        len -= n;
        if (s->stage_len == STAGE_BYTES) {
            int rc = flush_stage(s);
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

/* Write the data cluster BUF (NULL: zeros) of guest cluster GUEST, the subclusters of ALLOC. */
static int put_cluster(struct qstream *s, const uint8_t *buf, uint64_t guest, uint32_t alloc)
{
    uint64_t piece = 1ull << s->img.subcluster_bits;
    unsigned n = s->img.extended_l2 ? QCOW2_SUBCLUSTERS : 1;
    for (unsigned i = 0; i < n;) {
        if (!((alloc >> i) & 1)) {
            i++;
            continue;
        }
        unsigned j = i;
        while (j < n && ((alloc >> j) & 1))
            j++;
        uint64_t off = guest + i * piece, len = (uint64_t)(j - i) * piece;
        i = j;
        if (off >= s->img.virtual_size)
            break;
        len = CDM_MIN(len, s->img.virtual_size - off);
        int rc;
        if (buf == NULL) {
            rc = zero_guest(s, off, len);
        } else {
            rc = put_guest(s, buf + (off - guest), off, (size_t)len);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Decompress the compressed cluster of guest cluster GUEST from IN and write it; *USED
 * receives the compressed bytes it took. */
static int put_compressed(struct qstream *s, const uint8_t *in, size_t in_len, uint64_t guest,
                          size_t *used)
{
    int rc = qcow2_decompress(&s->img, s->dec, in, in_len, s->out, (size_t)s->cs, guest, used,
                              s->err);
    if (rc == 0)
        rc = put_cluster(s, s->out, guest, ALL_SUBCLUSTERS);
    return rc;
}

/* ---- held clusters ----------------------------------------------------------------------- */

static struct held *find_held(struct qstream *s, uint64_t host)
{
    size_t lo = 0, hi = s->n_held;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->held[mid].host < host)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < s->n_held && s->held[lo].host == host && !s->held[lo].dead)
        return &s->held[lo];
    return NULL;
}

static void drop_held(struct qstream *s, struct held *h)
{
    if (h->buf != NULL) {
        free(h->buf);
        give(s, s->cs);
    }
    h->buf = NULL;
    h->dead = true;
    s->n_dead++;
    if (s->n_dead > 16 && s->n_dead > s->n_held / 2) {
        size_t j = 0;
        for (size_t i = 0; i < s->n_held; i++)
            if (!s->held[i].dead)
                s->held[j++] = s->held[i];
        s->n_held = j;
        s->n_dead = 0;
    }
}

/* Keep the cluster BUF (LEN bytes) at host offset HOST; its unknown non-zero bytes are
 * [LO, HI) (LO == HI: it is all zeros). */
static int hold(struct qstream *s, uint64_t host, const uint8_t *buf, uint64_t len, uint64_t lo,
                uint64_t hi)
{
    int rc = grow(s, (void **)&s->held, &s->cap_held, s->n_held, sizeof *s->held,
                  "data", host, "arrived before its L2 table");
    if (rc < 0)
        return rc;
    struct held h = {.host = host, .todo_lo = (uint32_t)lo, .todo_hi = (uint32_t)hi};
    if (lo < hi) {
        rc = take(s, s->cs, "data", host, "arrived before its L2 table");
        if (rc < 0)
            return rc;
        h.buf = malloc(s->cs);
        if (h.buf == NULL) {
            give(s, s->cs);
            return fail(s, -ENOMEM, "out of memory");
        }
        memcpy(h.buf, buf, len);
        memset(h.buf + len, 0, s->cs - len);
    }
    s->held[s->n_held++] = h;
    return 0;
}

static int passed(struct qstream *s, uint64_t guest, uint64_t host)
{
    return fail(s, -CDM_EFORMAT,
                "L2 entry for guest offset 0x%llx points at host offset 0x%llx, which the stream "
                "has already passed as something else (metadata, other data, or bytes no entry "
                "named yet that were not kept)",
                HX(guest), HX(host));
}

/* The data cluster R lies behind the stream: write it from the held copy. */
static int data_behind(struct qstream *s, const struct ref *r)
{
    struct held *h = find_held(s, r->host);
    if (r->kind == REF_SKIP) {
        if (h != NULL && !h->claimed)
            drop_held(s, h);
        return 0;
    }
    if (h == NULL || h->claimed)
        return passed(s, r->guest, r->host);
    int rc = put_cluster(s, h->buf, r->guest, r->x);
    drop_held(s, h);
    return rc;
}

/* The compressed range R lies behind the stream: gather it from the held clusters. */
static int compressed_behind(struct qstream *s, const struct ref *r)
{
    uint64_t end = r->host + r->x;
    for (uint64_t c = CDM_ALIGN_DOWN(r->host, s->cs); c < end; c += s->cs) {
        struct held *h = find_held(s, c);
        if (h == NULL)
            return passed(s, r->guest, CDM_MAX(c, r->host));
        uint64_t a = CDM_MAX(c, r->host), b = CDM_MIN(c + s->cs, end);
        if (h->buf != NULL)
            memcpy(s->gather + (a - r->host), h->buf + (a - c), (size_t)(b - a));
        else
            memset(s->gather + (a - r->host), 0, (size_t)(b - a));
    }
    size_t used = 0;
    int rc = put_compressed(s, s->gather, r->x, r->guest, &used);
    if (rc < 0)
        return rc;
    /* The bytes taken are known now: free the clusters that have nothing unknown left. */
    uint64_t taken = r->host + used;
    for (uint64_t c = CDM_ALIGN_DOWN(r->host, s->cs); c < taken; c += s->cs) {
        struct held *h = find_held(s, c);
        if (h == NULL)
            continue;
        h->claimed = true;
        uint64_t a = CDM_MAX(c, r->host) - c, b = CDM_MIN(c + s->cs, taken) - c;
        if (a <= h->todo_lo && h->todo_lo < b) {
            h->todo_lo = (uint32_t)b;
            while (h->todo_lo < h->todo_hi && h->buf[h->todo_lo] == 0)
                h->todo_lo++;
        }
        if (h->todo_lo >= h->todo_hi)
            drop_held(s, h);
    }
    return 0;
}

/* ---- references ahead: a min-heap by host offset ---------------------------------------- */

static void heap_swap(struct ref *a, struct ref *b)
{
    struct ref t = *a;
    *a = *b;
    *b = t;
}

static int heap_push(struct qstream *s, const struct ref *r, uint64_t l2_host)
{
    int rc = grow(s, (void **)&s->heap, &s->cap_heap, s->n_heap, sizeof *s->heap,
                  "the L2 table", l2_host, "names data far ahead of it");
    if (rc < 0)
        return rc;
    size_t i = s->n_heap++;
    s->heap[i] = *r;
    while (i > 0 && s->heap[(i - 1) / 2].host > s->heap[i].host) {
        heap_swap(&s->heap[(i - 1) / 2], &s->heap[i]);
        i = (i - 1) / 2;
    }
    return 0;
}

static struct ref heap_pop(struct qstream *s)
{
    struct ref top = s->heap[0];
    s->heap[0] = s->heap[--s->n_heap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        if (l < s->n_heap && s->heap[l].host < s->heap[m].host)
            m = l;
        if (l + 1 < s->n_heap && s->heap[l + 1].host < s->heap[m].host)
            m = l + 1;
        if (m == i)
            break;
        heap_swap(&s->heap[i], &s->heap[m]);
        i = m;
    }
    return top;
}

/* ---- L2 tables ----------------------------------------------------------------------------- */

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* Route the reference R made by the L2 table at L2_HOST, which is arriving now. */
static int route(struct qstream *s, const struct ref *r, uint64_t l2_host)
{
    if (r->host >= l2_host + s->cs)
        return heap_push(s, r, l2_host);
    if (r->kind == REF_COMPRESSED)
        return compressed_behind(s, r);
    return data_behind(s, r);
}

/* Parse the L2 table T that has arrived in BUF. */
static int parse_l2(struct qstream *s, const struct l2_table *t, const uint8_t *buf)
{
    const struct qcow2_image *img = &s->img;
    uint64_t n = s->cs / img->entry_bytes;
    uint64_t base = t->l1_index << img->l1_shift;
    uint64_t piece = 1ull << img->subcluster_bits;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t cg = base + (i << img->cluster_bits);
        if (cg >= img->virtual_size)
            break;
        const uint8_t *ep = buf + i * img->entry_bytes;
        struct qcow2_entry d;
        int rc = qcow2_decode_l2(img, t->host, cg, be64(ep), img->extended_l2 ? be64(ep + 8) : 0,
                                 &d, s->err);
        if (rc < 0)
            return rc;
        struct ref r = {.host = d.host, .guest = cg, .x = ALL_SUBCLUSTERS, .kind = REF_DATA};
        if (d.kind == QCOW2_COMPRESSED) {
            r.kind = REF_COMPRESSED;
            r.x = (uint32_t)d.csize;
        } else if (d.kind != QCOW2_DATA) {
            rc = zero_guest(s, cg, s->cs);
            r.kind = REF_SKIP;
        } else if (img->extended_l2) {
            rc = qcow2_check_data(img, t->host, cg, &d, s->err);
            for (unsigned sc = 0; sc < QCOW2_SUBCLUSTERS && rc == 0; sc++)
                if (!((d.alloc >> sc) & 1))
                    rc = zero_guest(s, cg + sc * piece, piece);
            r.x = d.alloc;
            if (d.alloc == 0)
                r.kind = REF_SKIP;
        } else {
            rc = qcow2_check_data(img, t->host, cg, &d, s->err);
        }
        if (rc == 0 && r.host != 0)
            rc = route(s, &r, t->host);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ---- one host cluster ---------------------------------------------------------------------- */

static bool in_list(const uint64_t *v, size_t n, uint64_t key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && v[lo] == key;
}

/* What the host cluster at HOST is besides data, or NULL. */
static const char *metadata_role(struct qstream *s, uint64_t host)
{
    if (s->l2_next < s->n_l2 && s->l2[s->l2_next].host == host)
        return "an L2 table";
    for (unsigned i = 0; i < s->img.n_regions; i++) {
        const struct qcow2_region *g = &s->img.regions[i];
        if (host < g->end_host && g->start_host < host + s->cs)
            return g->what;
    }
    if (in_list(s->refblocks, s->n_refblocks, host))
        return "a refcount block";
    return NULL;
}

static int ended(struct qstream *s, uint64_t end, const char *what, uint64_t guest, uint64_t host)
{
    return fail(s, -EIO,
                "the image ended at offset %llu, before the %s of guest offset 0x%llx (host "
                "offset 0x%llx)",
                HX(end), what, HX(guest), HX(host));
}

/* A compressed range that runs past the end of the stream at END: what is there is all
 * there is (qemu does not pad the last one), provided the range ends in END's sector. */
static int compressed_at_end(struct qstream *s, uint64_t host, uint32_t csize, uint64_t end,
                             uint64_t guest)
{
    if (host >= end || host + csize > CDM_ALIGN_UP(end, 512))
        return ended(s, end, "compressed data", guest, host);
    return 0;
}

/* Feed the compressed ranges copied aside with the cluster BUF (LEN bytes at HOST).
 * *COVER becomes the end of the bytes they are known to take in it. */
static int feed_spans(struct qstream *s, uint64_t host, const uint8_t *buf, uint64_t len,
                      bool final, uint64_t *cover)
{
    size_t j = 0;
    int rc = 0;
    for (size_t i = 0; i < s->n_spans; i++) {
        struct span *p = &s->spans[i];
        if (rc == 0) {
            uint64_t n = CDM_MIN((uint64_t)(p->csize - p->filled), len);
            if (n > 0)
                memcpy(p->buf + p->filled, buf, (size_t)n);
            p->filled += (uint32_t)n;
            if (p->filled < p->csize && !final) {
                *cover = host + n;
                s->spans[j++] = *p;
                continue;
            }
            if (p->filled < p->csize)
                rc = compressed_at_end(s, p->host, p->csize, host + len, p->guest);
            size_t used = 0;
            if (rc == 0)
                rc = put_compressed(s, p->buf, p->filled, p->guest, &used);
            *cover = CDM_MAX(*cover, p->host + used);
        }
        free(p->buf);
        give(s, p->csize);
    }
    s->n_spans = rc < 0 ? 0 : j;
    return rc;
}

/* Start the compressed range R, whose first byte lies in the cluster BUF (LEN bytes at
 * HOST).  *COVER becomes the end of the bytes it is known to take. */
static int start_compressed(struct qstream *s, const struct ref *r, uint64_t host,
                            const uint8_t *buf, uint64_t len, bool final, uint64_t *cover)
{
    uint64_t end = host + len;
    if (r->host + r->x > end && !final) {
        int rc = grow(s, (void **)&s->spans, &s->cap_spans, s->n_spans, sizeof *s->spans,
                      "compressed data", r->host, "runs on past its cluster");
        if (rc == 0)
            rc = take(s, r->x, "compressed data", r->host, "runs on past its cluster");
        if (rc < 0)
            return rc;
        struct span p = {.host = r->host, .guest = r->guest, .csize = r->x,
                         .filled = (uint32_t)(end - r->host), .buf = malloc(r->x)};
        if (p.buf == NULL) {
            give(s, r->x);
            return fail(s, -ENOMEM, "out of memory");
        }
        memcpy(p.buf, buf + (r->host - host), p.filled);
        s->spans[s->n_spans++] = p;
        *cover = end;
        return 0;
    }
    uint64_t avail = r->x;
    if (r->host + r->x > end) {
        int rc = compressed_at_end(s, r->host, r->x, end, r->guest);
        if (rc < 0)
            return rc;
        avail = end - r->host;
    }
    size_t used = 0;
    int rc = put_compressed(s, buf + (r->host - host), (size_t)avail, r->guest, &used);
    *cover = CDM_MAX(*cover, r->host + used);
    return rc;
}

/* The bytes of its host cluster that the data reference R reads: up to the end of its last
 * allocated subcluster inside the virtual size (qemu need not write the rest). */
static uint64_t data_bytes(const struct qstream *s, const struct ref *r)
{
    uint64_t piece = 1ull << s->img.subcluster_bits, n = 0;
    unsigned count = s->img.extended_l2 ? QCOW2_SUBCLUSTERS : 1;
    for (unsigned i = 0; i < count; i++)
        if ((r->x >> i) & 1 && r->guest + i * piece < s->img.virtual_size)
            n = CDM_MIN((i + 1) * piece, s->img.virtual_size - r->guest);
    return n;
}

/* A gap [A, B) of the cluster BUF at HOST not taken by known data: widen [*LO, *HI) (offsets
 * in the cluster) over it when it holds a non-zero byte. */
static void gap(uint64_t host, const uint8_t *buf, uint64_t a, uint64_t b, uint64_t *lo,
                uint64_t *hi)
{
    if (a >= b || cdm_is_zero(buf + (a - host), (size_t)(b - a)))
        return;
    if (*lo == *hi)
        *lo = a - host;
    *hi = b - host;
}

/* The host cluster at s->cur_host has arrived in BUF (LEN bytes: the cluster size, or fewer
 * at the end of the stream when FINAL). */
static int arrive(struct qstream *s, const uint8_t *buf, uint64_t len, bool final)
{
    uint64_t host = s->cur_host, end = host + len;
    const char *role = metadata_role(s, host);
    uint64_t cover = host, lo = 0, hi = 0;
    bool touched = s->n_spans > 0;
    if (touched && role != NULL)
        return fail(s, -CDM_EFORMAT,
                    "compressed data for guest offset 0x%llx runs into %s (host offset 0x%llx)",
                    HX(s->spans[0].guest), role, HX(host));
    uint64_t claimer = touched ? s->spans[0].guest : 0;
    int rc = feed_spans(s, host, buf, len, final, &cover);
    bool have_data = false;
    struct ref data = {0};
    while (rc == 0 && s->n_heap > 0 && s->heap[0].host < host + s->cs) {
        struct ref r = heap_pop(s);
        if (r.kind == REF_SKIP)
            continue;
        if (role != NULL)
            return fail(s, -CDM_EFORMAT,
                        "L2 entry for guest offset 0x%llx points into %s (host offset 0x%llx)",
                        HX(r.guest), role, HX(host));
        if (have_data || (r.kind == REF_DATA && touched))
            return fail(s, -CDM_EFORMAT,
                        "the host cluster at offset 0x%llx is claimed twice (by the L2 entries "
                        "for guest offsets 0x%llx and 0x%llx)",
                        HX(host), HX(claimer), HX(r.guest));
        if (!touched)
            claimer = r.guest;
        touched = true;
        if (r.kind == REF_DATA) {
            data = r;
            have_data = true;
            continue;
        }
        gap(host, buf, cover, CDM_MIN(r.host, end), &lo, &hi);
        rc = start_compressed(s, &r, host, buf, len, final, &cover);
    }
    if (rc < 0)
        return rc;
    if (have_data) {
        if (len < data_bytes(s, &data))
            return ended(s, end, "data", data.guest, host);
        return put_cluster(s, buf, data.guest, data.x);
    }
    if (role != NULL && s->l2_next < s->n_l2 && s->l2[s->l2_next].host == host) {
        const struct l2_table *t = &s->l2[s->l2_next++];
        if (len < s->cs)
            return ended(s, end, "L2 table", t->l1_index << s->img.l1_shift, host);
        return parse_l2(s, t, buf);
    }
    if (role != NULL || final)
        return 0;
    if (!touched)
        return hold(s, host, buf, len, 0, cdm_is_zero(buf, (size_t)len) ? 0 : len);
    gap(host, buf, cover, end, &lo, &hi);
    return lo < hi ? hold(s, host, buf, len, lo, hi) : 0;
}

/* ---- phase 2: the stream, cluster by cluster --------------------------------------------- */

static int stream_bytes(struct qstream *s, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        int rc;
        if (s->cur_len == 0 && len >= s->cs) {
            rc = arrive(s, buf, s->cs, false);     /* a whole cluster in place */
            buf += s->cs;
            len -= (size_t)s->cs;
        } else {
            size_t n = (size_t)CDM_MIN((uint64_t)len, s->cs - s->cur_len);
            memcpy(s->cur + s->cur_len, buf, n);
            s->cur_len += n;
            buf += n;
            len -= n;
            if (s->cur_len < s->cs)
                return 0;
            rc = arrive(s, s->cur, s->cs, false);
            s->cur_len = 0;
        }
        if (rc < 0)
            return rc;
        s->cur_host += s->cs;
    }
    return 0;
}

/* ---- phase 1: the header and the tables ------------------------------------------------- */

static int mem_read(struct cdm_reader *r, void *buf, size_t len, uint64_t off, unsigned flags,
                    struct cdm_io *io)
{
    struct mem_reader *m = (struct mem_reader *)r;
    (void)flags;
    if (off > m->have || len > m->have - off) {
        m->need = CDM_MAX(m->need, off + len);
        return cdm_error_set(&io->error, CDM_SIDE_SOURCE, -EAGAIN,
                             "the first %llu bytes are needed", HX(off + len));
    }
    memcpy(buf, m->buf + off, len);
    return 0;
}

static const struct cdm_reader_ops mem_ops = {.name = "buffered stream", .read = mem_read};

static int compare_l2(const void *a, const void *b)
{
    const struct l2_table *x = a, *y = b;
    return x->host < y->host ? -1 : x->host > y->host;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The L1 table (buffered): zero the unallocated guest ranges, list the L2 tables by host. */
static int load_l1(struct qstream *s)
{
    const struct qcow2_image *img = &s->img;
    uint64_t span = 1ull << img->l1_shift;
    uint64_t n = (img->virtual_size + span - 1) >> img->l1_shift;
    s->l2 = calloc(n ? n : 1, sizeof *s->l2);
    if (s->l2 == NULL)
        return fail(s, -ENOMEM, "out of memory");
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l2_host;
        int rc = qcow2_decode_l1(img, i, be64(s->p1 + img->l1_off_host + i * 8), &l2_host,
                                 s->err);
        if (rc == 0 && l2_host == 0)
            rc = zero_guest(s, i * span, span);
        if (rc < 0)
            return rc;
        if (l2_host != 0)
            s->l2[s->n_l2++] = (struct l2_table){l2_host, i};
    }
    qsort(s->l2, s->n_l2, sizeof *s->l2, compare_l2);
    for (size_t i = 1; i < s->n_l2; i++)
        if (s->l2[i].host == s->l2[i - 1].host)
            return fail(s, -CDM_EFORMAT,
                        "L1 entries %llu and %llu share the L2 table at host offset 0x%llx",
                        HX(s->l2[i - 1].l1_index), HX(s->l2[i].l1_index), HX(s->l2[i].host));
    return 0;
}

/* The refcount table, when buffered: its blocks are never data. */
static int load_refcount_table(struct qstream *s)
{
    uint64_t off = s->img.info.refcount_table_offset;
    uint64_t n = ((uint64_t)s->img.info.refcount_table_clusters << s->img.cluster_bits) / 8;
    if (off + n * 8 > s->p1_len)
        return 0;
    s->refblocks = malloc((n ? n : 1) * sizeof *s->refblocks);
    if (s->refblocks == NULL)
        return fail(s, -ENOMEM, "out of memory");
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = be64(s->p1 + off + i * 8) & REFTABLE_OFFSET_MASK;
        if (b != 0 && CDM_IS_ALIGNED(b, s->cs) && b < FAKE_SIZE)
            s->refblocks[s->n_refblocks++] = b;
    }
    qsort(s->refblocks, s->n_refblocks, sizeof *s->refblocks, compare_u64);
    size_t j = 0;
    for (size_t i = 0; i < s->n_refblocks; i++)
        if (j == 0 || s->refblocks[j - 1] != s->refblocks[i])
            s->refblocks[j++] = s->refblocks[i];
    s->n_refblocks = j;
    return 0;
}

/* Phase 1 is complete: set up phase 2 and replay the buffered bytes through it. */
static int begin_stream(struct qstream *s)
{
    s->cs = s->img.cluster_size;
    s->cur = malloc(s->cs);
    s->out = malloc(s->cs);
    s->gather = malloc(2 * s->cs + 512);
    s->stage = cdm_alloc_aligned(STAGE_BYTES);
    s->dec = qcow2_decoder_get(&s->decoders);
    if (s->cur == NULL || s->out == NULL || s->gather == NULL || s->stage == NULL ||
        s->dec == NULL)
        return fail(s, -ENOMEM, "out of memory");
    int rc = load_l1(s);
    if (rc == 0)
        rc = load_refcount_table(s);
    if (rc < 0)
        return rc;
    s->ready = true;
    rc = stream_bytes(s, s->p1, (size_t)s->p1_len);
    free(s->p1);
    s->p1 = NULL;
    give(s, s->p1_cap);
    s->p1_cap = 0;
    return rc;
}

static int too_far(struct qstream *s)
{
    if (s->opened)
        return fail(s, -CDM_EUNSUPPORTED,
                    "the L1 table at offset 0x%llx lies beyond the first %llu bytes; this image "
                    "cannot be converted from a stream within the memory limit",
                    HX(s->img.l1_off_host), HX(s->limit));
    return fail(s, -CDM_EUNSUPPORTED,
                "the QCOW2 header and its tables need the first %llu bytes, beyond the first "
                "%llu; this image cannot be converted from a stream within the memory limit",
                HX(s->need), HX(s->limit));
}

/* Try to open the buffered header (FINAL: the stream ended, the buffer is the whole image).
 * Sets s->want and s->need when more bytes are needed. */
static int try_open(struct qstream *s, bool final)
{
    if (!s->opened || final) {
        s->mr = (struct mem_reader){.r = {.ops = &mem_ops, .size = final ? s->p1_len : FAKE_SIZE,
                                          .align = 1},
                                    .buf = s->p1, .have = s->p1_len};
        struct cdm_error e = {0};
        int rc = qcow2_open(&s->img, &s->mr.r, &e);
        if (!final && s->mr.need > s->p1_len) {
            s->need = s->mr.need;
            s->want = CDM_MAX(s->need, s->p1_len + s->p1_len / 2);
            return s->need > s->limit ? too_far(s) : 0;
        }
        if (rc < 0)
            return cdm_error_take(s->err, &e);
        rc = qcow2_refuse(&s->img, s->err);
        if (rc < 0)
            return rc;
        if (s->img.virtual_size > s->w->size)
            return cdm_error_set(s->err, CDM_SIDE_TARGET, -CDM_ETOOSMALL,
                                 "the image's virtual size %llu is larger than the target (%llu "
                                 "bytes)",
                                 HX(s->img.virtual_size), HX(s->w->size));
        s->opened = true;
        uint64_t n_l1 = (s->img.virtual_size + (1ull << s->img.l1_shift) - 1) >>
                        s->img.l1_shift;
        s->need = s->img.l1_off_host + n_l1 * 8;
        if (s->need > s->limit)
            return too_far(s);
        uint64_t rt_end = s->img.info.refcount_table_offset +
                          ((uint64_t)s->img.info.refcount_table_clusters << s->img.cluster_bits);
        if (rt_end <= s->limit && (!final || rt_end <= s->p1_len))
            s->need = CDM_MAX(s->need, rt_end);
        s->want = s->need;
    }
    if (s->p1_len < s->need)
        return final ? ended(s, s->p1_len, "L1 table", 0, s->img.l1_off_host) : 0;
    return begin_stream(s);
}

/* Buffer LEN bytes of BUF for phase 1, opening when enough are there; *TAKEN receives how
 * many were buffered. */
static int buffer_header(struct qstream *s, const uint8_t *buf, size_t len, size_t *taken)
{
    *taken = 0;
    while (!s->ready && *taken < len) {
        if (s->p1_len >= CDM_MIN(s->want, s->limit) && s->p1_len >= s->need) {
            int rc = try_open(s, false);
            if (rc < 0 || s->ready)
                return rc;
            continue;
        }
        if (s->p1_len >= s->limit)
            return too_far(s);
        uint64_t target = CDM_MIN(s->want, s->limit);
        size_t n = (size_t)CDM_MIN((uint64_t)(len - *taken), target - s->p1_len);
        if (s->p1_len + n > s->p1_cap) {
            uint64_t ncap = CDM_MIN(CDM_MAX(s->p1_cap * 2, s->p1_len + n), s->limit);
            int rc = take(s, ncap - s->p1_cap, "the header", 0, "is being buffered");
            if (rc < 0)
                return rc;
            uint8_t *np = realloc(s->p1, (size_t)ncap);
            if (np == NULL) {
                give(s, ncap - s->p1_cap);
                return fail(s, -ENOMEM, "out of memory");
            }
            s->p1 = np;
            s->p1_cap = ncap;
        }
        memcpy(s->p1 + s->p1_len, buf + *taken, n);
        s->p1_len += n;
        *taken += n;
    }
    if (!s->ready && s->p1_len >= CDM_MIN(s->want, s->limit) && s->p1_len >= s->need)
        return try_open(s, false);
    return 0;
}

/* ---- the sink -------------------------------------------------------------------------- */

static int qs_push(struct cdm_sink *sink, const uint8_t *buf, size_t len)
{
    struct qstream *s = (struct qstream *)sink;
    if (s->rc < 0)
        return s->rc;
    if (s->ended)
        return cdm_error_set(s->err, CDM_SIDE_NONE, -EINVAL, "bytes pushed after the end");
    int rc = 0;
    if (!s->ready) {
        size_t taken;
        rc = buffer_header(s, buf, len, &taken);
        buf += taken;
        len -= taken;
    }
    if (rc == 0 && len > 0)
        rc = stream_bytes(s, buf, len);
    if (rc < 0)
        s->rc = rc;
    return rc;
}

static int finish(struct qstream *s, struct cdm_stream_result *res)
{
    int rc = 0;
    if (!s->ready)
        rc = try_open(s, true);
    uint64_t end = s->cur_host + s->cur_len;
    uint64_t cover = end;
    if (rc == 0 && s->cur_len > 0)
        rc = arrive(s, s->cur, s->cur_len, true);
    else if (rc == 0 && s->n_spans > 0)
        rc = feed_spans(s, end, s->cur, 0, true, &cover);
    while (rc == 0 && s->n_heap > 0) {
        struct ref r = heap_pop(s);
        if (r.kind != REF_SKIP)
            rc = ended(s, end, r.kind == REF_DATA ? "data" : "compressed data", r.guest, r.host);
    }
    if (rc == 0 && s->l2_next < s->n_l2)
        rc = ended(s, end, "L2 table", s->l2[s->l2_next].l1_index << s->img.l1_shift,
                   s->l2[s->l2_next].host);
    if (rc == 0)
        rc = flush_stage(s);
    if (rc == 0)
        rc = flush_zero(s);
    if (rc == 0 && res != NULL) {
        res->image_size = s->img.virtual_size;
        res->peak_held = s->peak;
        res->format = CDM_FORMAT_QCOW2;
    }
    return rc;
}

static int qs_end(struct cdm_sink *sink, struct cdm_stream_result *res)
{
    struct qstream *s = (struct qstream *)sink;
    if (s->rc < 0)
        return s->rc;
    if (s->ended)
        return cdm_error_set(s->err, CDM_SIDE_NONE, -EINVAL, "the stream has already ended");
    s->ended = true;
    s->rc = finish(s, res);
    return s->rc;
}

static void qs_destroy(struct cdm_sink *sink)
{
    struct qstream *s = (struct qstream *)sink;
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->n_held; i++)
        free(s->held[i].buf);
    for (size_t i = 0; i < s->n_spans; i++)
        free(s->spans[i].buf);
    if (s->dec != NULL)
        qcow2_decoder_put(&s->decoders, s->dec);
    qcow2_decoders_fini(&s->decoders);
    free(s->held);
    free(s->spans);
    free(s->heap);
    free(s->l2);
    free(s->refblocks);
    free(s->cur);
    free(s->out);
    free(s->gather);
    free(s->stage);
    free(s->p1);
    free(s);
}

/* Create the streaming QCOW2 converter onto W into *OUT: it holds at most MEM_LIMIT bytes
 * (0: 64 MiB) of the stream and of what it must remember; messages go to ERR, which must
 * outlive the sink.  end() fills image_size (the virtual size), peak_held and format of its
 * result.  0 or -ENOMEM (message in ERR). */
int cdm_qcow2_stream_new(cdm_writer *w, uint64_t mem_limit, struct cdm_error *err,
                         struct cdm_sink **out)
{
    *out = NULL;
    struct qstream *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    s->sink.push = qs_push;
    s->sink.end = qs_end;
    s->sink.destroy = qs_destroy;
    s->w = w;
    s->err = err;
    s->limit = mem_limit ? mem_limit : DEFAULT_MEM_LIMIT;
    s->known_zero = (w->flags & CDM_COPY_TARGET_IS_ZERO) != 0;
    s->want = 112;      /* the fixed header, then the header cluster */
    qcow2_decoders_init(&s->decoders);
    *out = &s->sink;
    return 0;
}
