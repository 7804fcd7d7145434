/* tar.c -- the tar stage of a stream: a container image layer (a tar archive, already
 * decompressed) arrives in order; the single regular file directly under one directory
 * (a containerDisk's "disk/") is streamed through a detection stage of its own (gzip, xz or
 * zstd inside the member, then RAW or QCOW2) onto the writer, and every other member is
 * skipped.  Nothing is buffered beyond one 512-byte header block, the extended headers of
 * the next member (at most META_MAX bytes) and a sparse member's map.
 *
 * Formats: POSIX ustar (name prefix), GNU (long names 'L', long link names 'K', old sparse
 * members 'S' with extension blocks) and pax ('x' records: path, size, GNU.sparse.* of the
 * sparse formats 0.0, 0.1 and 1.0; 'g' global records are checked and otherwise ignored).
 * Every header is validated: its checksum (unsigned or signed sum), its magic (v7 archives
 * are refused), octal or base-256 numbers, pax record lengths, name lengths.  Sizes are
 * never used to allocate: a member's data is consumed as it arrives, and an archive that ends
 * early (no end-of-archive block) is truncated.  Bytes after the end-of-archive block must
 * be zeros (the padding of the last record).
 *
 * Paths are normalised ("./disk//x" is "disk/x"; "." components dropped, ".." resolved,
 * leaving the root is an error).  Under the directory D:
 *   - the first regular file directly in D is the image; any other non-directory entry under
 *     D (a second file, one in a subdirectory, a link) is an error naming both at the end;
 *   - whiteouts: ".wh.NAME" hides NAME of lower layers, ".wh..wh..opq" hides a directory's
 *     lower contents.  A whiteout (or an opaque directory, or a non-directory) at D or one of
 *     its parents sets tar_hidden: lower layers have no D.  Whiteouts inside D are listed in
 *     tar_names (".wh.NAME") for the caller to skip NAME in lower layers (opts->tar_skip).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"

#define BLOCK 512
#define NAME_CAP 4096                   /* longest path accepted */
#define META_MAX (1u << 20)             /* bytes of one 'L', 'K', 'x' or 'g' entry */
#define MAX_SEGS (1u << 18)             /* entries of a sparse map */
#define ZEROS (64u << 10)
#define ULL(v) ((unsigned long long)(v))

static const uint8_t zeros[ZEROS];

enum state { ST_HEADER, ST_SPARSE_EXT, ST_DATA, ST_PAD, ST_END };
enum kind { K_SKIP, K_MEMBER, K_LONGNAME, K_LONGLINK, K_PAX, K_GLOBAL };
enum sparse { SP_NONE, SP_OLD, SP_PAX0, SP_PAX1 };

struct seg {
    uint64_t off, len;
};

struct tar {
    struct cdm_sink sink;
    cdm_writer *w;
    struct cdm_stream_opts opts;    /* for the member's pipeline */
    struct cdm_error *err;
    uint64_t limit;                 /* bytes the archive may have */
    char dir[256];                  /* D, normalised */
    size_t dir_len;
    char *skip;                     /* "\n" + names + "\n" (owned) */

    int state;
    uint8_t block[BLOCK];
    size_t fill;
    uint64_t total;                 /* bytes received */
    uint64_t left;                  /* data bytes of the current entry still to come */
    uint64_t pad;                   /* padding bytes after them */
    int kind;
    uint32_t entries;

    /* what extended headers said about the next entry */
    uint8_t *meta;                  /* data of the current 'L', 'K', 'x' or 'g' entry */
    size_t meta_len;
    char *long_name;                /* owned, or NULL */
    char *pax_path;                 /* owned, or NULL */
    bool pax_size_set;
    uint64_t pax_size;
    int pax_sparse;                 /* SP_NONE, SP_PAX0, SP_PAX1 */
    bool pax_realsize_set;
    uint64_t pax_realsize;
    char *pax_sparse_name;          /* owned, or NULL */
    bool pax_offset_pending;        /* 0.0: an offset waiting for its numbytes */
    /* an entry whose old sparse extension blocks are being read */
    char meta_name[NAME_CAP + 260];
    uint64_t meta_size;
    uint8_t meta_type;
    uint64_t data_size;             /* stored bytes of the current entry */

    /* the sparse map of the current (or next, for pax) member */
    struct seg *map;
    size_t n_map, cap_map;
    uint64_t realsize;
    int sparse;                     /* SP_* of the current member */
    bool ext_more;                  /* SP_OLD: another extension block follows */
    /* SP_PAX1: the map at the start of the data, parsed digit by digit */
    bool map_done;
    uint64_t map_bytes;             /* bytes of the map read */
    uint64_t map_num;
    int map_digits;
    uint64_t map_count;             /* entries announced (the first number) */
    bool map_count_read;
    uint64_t map_numbers;           /* numbers read after the count */

    /* the member */
    struct cdm_sink *inner;
    struct cdm_stream_result inner_res;
    bool found, member_done, hidden;
    uint64_t pos;                   /* bytes of the member's content pushed (holes included) */
    size_t seg_i;
    uint64_t seg_left;
    bool seg_started;
    char member[256];
    char extra[256];                /* the first other non-directory under D */
    uint32_t n_extra;
    char names[1024];
    size_t names_len;
    bool names_cut;
    bool ended_marker;
};

static int bad(struct tar *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A malformed archive: -CDM_EFORMAT with "the layer's archive: ..." and the entry's offset. */
static int bad(struct tar *t, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return cdm_error_set(t->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                         "the layer's tar archive is malformed near byte %llu: %s",
                         ULL(t->total), msg);
}

/* ---- fields --------------------------------------------------------------------------------- */

/* A numeric field of N bytes: octal digits (leading spaces, then a NUL or space ending them;
 * an empty field is 0) or GNU base-256 (first byte 0x80; negative values are refused).
 * 0 or -1. */
static int parse_num(const uint8_t *f, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (f[0] & 0x80) {
        if (f[0] != 0x80)
            return -1;          /* negative (0xff) or not a number */
        for (size_t i = 1; i < n; i++) {
            if (v >> 56)
                return -1;
            v = (v << 8) | f[i];
        }
        *out = v;
        return 0;
    }
    size_t i = 0;
    while (i < n && f[i] == ' ')
        i++;
    size_t digits = 0;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++, digits++) {
        if (v >> 61)
            return -1;
        v = (v << 3) | (uint64_t)(f[i] - '0');
    }
    for (; i < n; i++)
        if (f[i] != ' ' && f[i] != '\0')
            return -1;
    (void)digits;
    *out = v;
    return 0;
}

/* Copy SRC into DST (CAP bytes), cut to fit. */
static void copy_cut(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static bool all_zero(const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i] != 0)
            return false;
    return true;
}

/* Normalise IN into OUT (NAME_CAP + 1 bytes): no empty or "." components, ".." resolved,
 * no leading or trailing '/'.  Its length, or -1 when it leaves the root or is too long. */
static long normalise(const char *in, char *out)
{
    size_t len = 0;
    const char *p = in;
    while (*p != '\0') {
        while (*p == '/')
            p++;
        const char *c = p;
        while (*p != '\0' && *p != '/')
            p++;
        size_t n = (size_t)(p - c);
        if (n == 0 || (n == 1 && c[0] == '.'))
            continue;
        if (n == 2 && c[0] == '.' && c[1] == '.') {
            if (len == 0)
                return -1;
            while (len > 0 && out[len - 1] != '/')
                len--;
            if (len > 0)
                len--;
            continue;
        }
        if (len + (len > 0) + n > NAME_CAP)
            return -1;
        if (len > 0)
            out[len++] = '/';
        memcpy(out + len, c, n);
        len += n;
    }
    out[len] = '\0';
    return (long)len;
}

/* Whether A (normalised) is D or one of D's parents (the root "" included). */
static bool covers_dir(const struct tar *t, const char *a)
{
    size_t n = strlen(a);
    if (n == 0)
        return true;
    return n <= t->dir_len && memcmp(a, t->dir, n) == 0 &&
           (n == t->dir_len || t->dir[n] == '/');
}

/* Append NAME (+ SUFFIX) to the list of names under D, "..." once full. */
static void note_name(struct tar *t, const char *prefix, const char *name, const char *suffix)
{
    if (t->names_cut)
        return;
    size_t need = strlen(prefix) + strlen(name) + strlen(suffix) + 1;
    if (t->names_len + need + 4 >= sizeof t->names) {
        memcpy(t->names + t->names_len, "...", 4);
        t->names_len += 3;
        t->names_cut = true;
        return;
    }
    t->names_len += (size_t)snprintf(t->names + t->names_len, sizeof t->names - t->names_len,
                                     "%s%s%s\n", prefix, name, suffix);
}

static bool skipped(const struct tar *t, const char *rel)
{
    if (t->skip == NULL)
        return false;
    size_t n = strlen(rel);
    for (const char *p = t->skip; (p = strstr(p, rel)) != NULL; p++)
        if (p > t->skip && p[-1] == '\n' && p[n] == '\n')
            return true;
    return false;
}

/* ---- extended headers ------------------------------------------------------------------------ */

static int set_str(struct tar *t, char **slot, const char *v, size_t n)
{
    if (n > NAME_CAP || memchr(v, '\0', n) != NULL)
        return bad(t, "a path of %zu bytes, or with a NUL byte, in an extended header", n);
    char *s = malloc(n + 1);
    if (s == NULL)
        return cdm_error_set(t->err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    memcpy(s, v, n);
    s[n] = '\0';
    free(*slot);
    *slot = s;
    return 0;
}

/* A decimal number of pax value V (N bytes); 0 or -1. */
static int pax_num(const char *v, size_t n, uint64_t *out)
{
    uint64_t x = 0;
    if (n == 0 || n > 20)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9' || x > (UINT64_MAX - 9) / 10)
            return -1;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    *out = x;
    return 0;
}

static int add_seg(struct tar *t, uint64_t off, uint64_t len)
{
    if (t->n_map == MAX_SEGS)
        return bad(t, "a sparse map of more than %u entries", MAX_SEGS);
    if (t->n_map == t->cap_map) {
        size_t cap = t->cap_map ? t->cap_map * 2 : 16;
        struct seg *m = realloc(t->map, cap * sizeof *m);
        if (m == NULL)
            return cdm_error_set(t->err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
        t->map = m;
        t->cap_map = cap;
    }
    t->map[t->n_map++] = (struct seg){off, len};
    return 0;
}

/* A GNU.sparse.map value: "offset,numbytes,offset,numbytes...". */
static int pax_map(struct tar *t, const char *v, size_t n)
{
    t->n_map = 0;
    size_t i = 0;
    uint64_t pair[2];
    int k = 0;
    while (i <= n && n > 0) {
        size_t j = i;
        while (j < n && v[j] != ',')
            j++;
        if (pax_num(v + i, j - i, &pair[k]) < 0)
            return bad(t, "a malformed GNU.sparse.map");
        if (++k == 2) {
            int rc = add_seg(t, pair[0], pair[1]);
            if (rc < 0)
                return rc;
            k = 0;
        }
        i = j + 1;
    }
    return k == 0 ? 0 : bad(t, "a GNU.sparse.map with an odd count of numbers");
}

/* The records of a pax header (T->meta): "LEN KEY=VALUE\n" each.  GLOBAL ones are checked,
 * not applied. */
static int parse_pax(struct tar *t, bool global)
{
    const char *p = (const char *)t->meta;
    size_t left = t->meta_len;
    while (left > 0) {
        size_t len = 0, i = 0;
        while (i < left && i < 8 && p[i] >= '0' && p[i] <= '9')
            len = len * 10 + (size_t)(p[i++] - '0');
        if (i == 0 || i >= left || p[i] != ' ' || len <= i + 1 || len > left ||
            p[len - 1] != '\n')
            return bad(t, "a malformed pax record");
        const char *key = p + i + 1;
        const char *end = p + len - 1;
        const char *eq = memchr(key, '=', (size_t)(end - key));
        if (eq == NULL || eq == key)
            return bad(t, "a pax record without a key");
        size_t klen = (size_t)(eq - key);
        const char *v = eq + 1;
        size_t vlen = (size_t)(end - v);
        p += len;
        left -= len;
        if (global)
            continue;
#define KEY(s) (klen == sizeof(s) - 1 && memcmp(key, s, klen) == 0)
        int rc = 0;
        uint64_t x;
        if (KEY("path")) {
            rc = set_str(t, &t->pax_path, v, vlen);
        } else if (KEY("size")) {
            if (pax_num(v, vlen, &t->pax_size) < 0)
                return bad(t, "a malformed pax size");
            t->pax_size_set = true;
        } else if (KEY("GNU.sparse.major") || KEY("GNU.sparse.minor")) {
            if (pax_num(v, vlen, &x) < 0 || x > 1)
                return bad(t, "an unknown GNU sparse format version");
            if (KEY("GNU.sparse.major") && x == 1)
                t->pax_sparse = SP_PAX1;
            else if (t->pax_sparse == SP_NONE)
                t->pax_sparse = SP_PAX0;
        } else if (KEY("GNU.sparse.name")) {
            rc = set_str(t, &t->pax_sparse_name, v, vlen);
        } else if (KEY("GNU.sparse.realsize") || KEY("GNU.sparse.size")) {
            if (pax_num(v, vlen, &t->pax_realsize) < 0)
                return bad(t, "a malformed GNU.sparse size");
            t->pax_realsize_set = true;
        } else if (KEY("GNU.sparse.numblocks")) {
            if (pax_num(v, vlen, &x) < 0 || x > MAX_SEGS)
                return bad(t, "a malformed or too large GNU.sparse.numblocks");
            if (t->pax_sparse == SP_NONE)
                t->pax_sparse = SP_PAX0;
        } else if (KEY("GNU.sparse.offset")) {
            if (pax_num(v, vlen, &t->map_num) < 0 || t->pax_offset_pending)
                return bad(t, "a malformed GNU.sparse.offset");
            t->pax_offset_pending = true;
            if (t->pax_sparse == SP_NONE)
                t->pax_sparse = SP_PAX0;
        } else if (KEY("GNU.sparse.numbytes")) {
            if (pax_num(v, vlen, &x) < 0 || !t->pax_offset_pending)
                return bad(t, "a malformed GNU.sparse.numbytes");
            t->pax_offset_pending = false;
            rc = add_seg(t, t->map_num, x);
        } else if (KEY("GNU.sparse.map")) {
            rc = pax_map(t, v, vlen);
            if (t->pax_sparse == SP_NONE)
                t->pax_sparse = SP_PAX0;
        }
#undef KEY
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void reset_meta(struct tar *t)
{
    free(t->long_name);
    free(t->pax_path);
    free(t->pax_sparse_name);
    t->long_name = t->pax_path = t->pax_sparse_name = NULL;
    t->pax_size_set = t->pax_realsize_set = t->pax_offset_pending = false;
    t->pax_sparse = SP_NONE;
}

/* ---- the member ------------------------------------------------------------------------------ */

/* Push LEN bytes into the member's pipeline. */
static int inner_push(struct tar *t, const uint8_t *buf, size_t len)
{
    t->pos += len;
    return len > 0 ? t->inner->push(t->inner, buf, len) : 0;
}

static int push_zeros(struct tar *t, uint64_t n)
{
    while (n > 0) {
        size_t k = (size_t)CDM_MIN(n, (uint64_t)ZEROS);
        int rc = inner_push(t, zeros, k);
        if (rc < 0)
            return rc;
        n -= k;
    }
    return 0;
}

/* Check a sparse map against the member's full size and the STORED bytes that follow. */
static int check_map(struct tar *t, uint64_t stored)
{
    uint64_t end = 0, sum = 0;
    for (size_t i = 0; i < t->n_map; i++) {
        const struct seg *s = &t->map[i];
        if (s->off < end || s->len > t->realsize || s->off > t->realsize - s->len)
            return bad(t, "a sparse map whose entries overlap, are out of order or pass the "
                       "file's size");
        end = s->off + s->len;
        sum += s->len;
    }
    if (sum != stored)
        return bad(t, "a sparse map of %llu bytes of data for %llu bytes stored", ULL(sum),
                   ULL(stored));
    return 0;
}

/* Stored bytes of a sparse member's data (after any map) into its segments. */
static int sparse_data(struct tar *t, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        while (t->seg_i < t->n_map && !t->seg_started) {
            int rc = push_zeros(t, t->map[t->seg_i].off - t->pos);
            if (rc < 0)
                return rc;
            t->seg_left = t->map[t->seg_i].len;
            t->seg_started = true;
            if (t->seg_left == 0) {
                t->seg_i++;
                t->seg_started = false;
            }
        }
        if (t->seg_i >= t->n_map)
            return bad(t, "sparse data beyond the map");
        size_t n = (size_t)CDM_MIN((uint64_t)len, t->seg_left);
        int rc = inner_push(t, buf, n);
        if (rc < 0)
            return rc;
        buf += n;
        len -= n;
        t->seg_left -= n;
        if (t->seg_left == 0) {
            t->seg_i++;
            t->seg_started = false;
        }
    }
    return 0;
}

/* A format-1.0 sparse map: decimal numbers, one a line (the count, then offset and size
 * pairs), padded to a block.  Returns the bytes of BUF it took. */
static long map_text(struct tar *t, const uint8_t *buf, size_t len)
{
    size_t i = 0;
    while (i < len && !t->map_done) {
        uint8_t c = buf[i++];
        t->map_bytes++;
        if (c >= '0' && c <= '9') {
            if (++t->map_digits > 20 || t->map_num > (UINT64_MAX - 9) / 10)
                return bad(t, "a malformed sparse map");
            t->map_num = t->map_num * 10 + (uint64_t)(c - '0');
            continue;
        }
        if (c != '\n' || t->map_digits == 0)
            return bad(t, "a malformed sparse map");
        uint64_t v = t->map_num;
        t->map_num = 0;
        t->map_digits = 0;
        if (!t->map_count_read) {
            if (v > MAX_SEGS)
                return bad(t, "a sparse map of %llu entries", ULL(v));
            t->map_count = v;
            t->map_count_read = true;
        } else if (t->map_numbers++ % 2 == 0) {
            t->seg_left = v;        /* the offset, until its size arrives */
        } else {
            int rc = add_seg(t, t->seg_left, v);
            if (rc < 0)
                return rc;
            t->seg_left = 0;
        }
        if (t->map_count_read && t->map_numbers == 2 * t->map_count)
            t->map_done = true;
    }
    if (t->map_done) {
        uint64_t padded = (t->map_bytes + BLOCK - 1) / BLOCK * BLOCK;
        if (padded > t->data_size)
            return bad(t, "a sparse map longer than the member");
        int rc = check_map(t, t->data_size - padded);
        if (rc < 0)
            return rc;
        t->map_bytes = padded - t->map_bytes;    /* from now on: padding still to skip */
    }
    return (long)i;
}

static int member_data(struct tar *t, const uint8_t *buf, size_t len)
{
    if (t->sparse == SP_NONE)
        return inner_push(t, buf, len);
    if (t->sparse == SP_PAX1 && !t->map_done) {
        long took = map_text(t, buf, len);
        if (took < 0)
            return (int)took;
        buf += took;
        len -= (size_t)took;
    }
    if (t->sparse == SP_PAX1 && t->map_done && t->map_bytes > 0) {
        size_t n = (size_t)CDM_MIN((uint64_t)len, t->map_bytes);
        t->map_bytes -= n;
        buf += n;
        len -= n;
    }
    return sparse_data(t, buf, len);
}

/* The member's bytes are all in: holes up to its size, then end its pipeline. */
static int member_end(struct tar *t)
{
    int rc = 0;
    if (t->sparse == SP_PAX1 && !t->map_done)
        return bad(t, "a sparse member that ends inside its map");
    if (t->sparse != SP_NONE) {
        if (t->seg_i < t->n_map && t->map[t->seg_i].len > 0)
            return bad(t, "a sparse member shorter than its map");
        rc = push_zeros(t, t->realsize - t->pos);
    }
    if (rc == 0)
        rc = t->inner->end(t->inner, &t->inner_res);
    t->member_done = true;
    return rc;
}

/* ---- headers --------------------------------------------------------------------------------- */

static int check_header(struct tar *t, const uint8_t *h)
{
    uint64_t want;
    if (parse_num(h + 148, 8, &want) < 0)
        return bad(t, "a header checksum that is not a number");
    uint64_t usum = 0;
    int64_t ssum = 0;
    for (size_t i = 0; i < BLOCK; i++) {
        uint8_t c = (i >= 148 && i < 156) ? ' ' : h[i];
        usum += c;
        ssum += (int8_t)c;
    }
    if (usum != want && (uint64_t)ssum != want)
        return bad(t, "a header whose checksum is wrong (%llo, computed %llo)", ULL(want),
                   ULL(usum));
    bool posix = memcmp(h + 257, "ustar\0", 6) == 0;
    bool gnu = memcmp(h + 257, "ustar  \0", 8) == 0;
    if (!posix && !gnu)
        return bad(t, "a header that is neither ustar nor GNU (v7 archives are not read)");
    return posix ? 1 : 2;
}

/* The header's own name: prefix "/" name for ustar, name alone for GNU. */
static void header_name(const uint8_t *h, bool posix, char *out)
{
    size_t pn = posix ? strnlen((const char *)h + 345, 155) : 0;
    size_t nn = strnlen((const char *)h, 100);
    size_t len = 0;
    if (pn > 0) {
        memcpy(out, h + 345, pn);
        out[pn] = '/';
        len = pn + 1;
    }
    memcpy(out + len, h, nn);
    out[len + nn] = '\0';
}

/* Sparse entries of an old GNU header or extension block: N pairs of 12-byte numbers. */
static int old_sparse(struct tar *t, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++, p += 24) {
        if (all_zero(p, 24))
            return 0;
        uint64_t off, len;
        if (parse_num(p, 12, &off) < 0 || parse_num(p + 12, 12, &len) < 0)
            return bad(t, "a malformed sparse entry");
        int rc = add_seg(t, off, len);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Start the data of the entry described: where its bytes go. */
static void start_data(struct tar *t, int kind, uint64_t size)
{
    t->kind = kind;
    t->left = size;
    t->data_size = size;
    t->pad = (BLOCK - size % BLOCK) % BLOCK;
    t->state = size > 0 ? ST_DATA : ST_HEADER;
}

/* The entry whose header (and sparse extension blocks) were read: decide what it is. */
static int entry(struct tar *t, const char *raw_name, uint8_t type, uint64_t size)
{
    char name[NAME_CAP + 1];
    long nlen = normalise(raw_name, name);
    t->entries++;
    if (nlen < 0)
        return bad(t, "the entry \"%.200s\" leaves the archive's root or is too long", raw_name);
    bool is_dir = type == '5';
    bool is_file = type == '0' || type == '\0' || type == '7' || type == 'S';
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    size_t parent_len = base == name ? 0 : (size_t)(base - name - 1);
    char parent[NAME_CAP + 1];
    memcpy(parent, name, parent_len);
    parent[parent_len] = '\0';
    bool in_dir = (size_t)nlen > t->dir_len && memcmp(name, t->dir, t->dir_len) == 0 &&
                  name[t->dir_len] == '/';
    const char *rel = in_dir ? name + t->dir_len + 1 : NULL;
    int kind = K_SKIP;

    if (strncmp(base, ".wh.", 4) == 0) {
        if (strcmp(base, ".wh..wh..opq") == 0) {
            if (covers_dir(t, parent))
                t->hidden = true;
            else if (in_dir)
                note_name(t, "", rel, "");
        } else {
            char whited[2 * NAME_CAP + 2];
            size_t bl = strlen(base + 4);
            memcpy(whited, parent, parent_len);
            size_t wl = parent_len;
            if (parent_len > 0)
                whited[wl++] = '/';
            memcpy(whited + wl, base + 4, bl + 1);
            if (covers_dir(t, whited))
                t->hidden = true;
            else if (in_dir)
                note_name(t, "", rel, "");
        }
    } else if ((size_t)nlen == t->dir_len && memcmp(name, t->dir, t->dir_len) == 0) {
        if (!is_dir)
            t->hidden = true;       /* a file or link in the directory's place */
    } else if (!in_dir) {
        if (!is_dir && covers_dir(t, name))
            t->hidden = true;       /* a parent replaced by a non-directory */
    } else if (skipped(t, rel)) {
        /* hidden by an upper layer's whiteout */
    } else if (is_file && strchr(rel, '/') == NULL && !t->found) {
        t->found = true;
        copy_cut(t->member, sizeof t->member, name);
        kind = K_MEMBER;
    } else {
        note_name(t, "", rel, is_dir ? "/" : "");
        if (!is_dir && t->n_extra++ == 0)
            copy_cut(t->extra, sizeof t->extra, name);
    }

    if (kind == K_MEMBER) {
        int rc = cdm_detect_new(t->w, &t->opts, t->err, &t->inner);
        if (rc < 0)
            return rc;
        t->pos = 0;
        t->seg_i = 0;
        t->seg_started = false;
        if (t->sparse == SP_NONE)
            t->realsize = size;
        else if (t->sparse != SP_PAX1) {
            rc = check_map(t, size);
            if (rc < 0)
                return rc;
        }
        start_data(t, K_MEMBER, size);
        if (size == 0 && t->sparse != SP_PAX1)
            return member_end(t);
        if (size == 0)
            return bad(t, "a sparse member without its map");
        return 0;
    }
    start_data(t, K_SKIP, size);
    return 0;
}

/* A header block: the end marker, an extended header (its data follows) or an entry's
 * header (1: the caller goes on with entry_header). */
static int header_block(struct tar *t)
{
    const uint8_t *h = t->block;
    if (all_zero(h, BLOCK)) {
        t->state = ST_END;
        t->ended_marker = true;
        return 0;
    }
    int fmt = check_header(t, h);
    if (fmt < 0)
        return fmt;
    uint64_t size;
    if (parse_num(h + 124, 12, &size) < 0)
        return bad(t, "a malformed size field");
    uint8_t type = h[156];
    if (type != 'L' && type != 'K' && type != 'x' && type != 'g')
        return 1;
    if (size == 0 || size > META_MAX)
        return bad(t, "an extended header of %llu bytes (1 to %u)", ULL(size), META_MAX);
    free(t->meta);
    t->meta = malloc(size);
    if (t->meta == NULL)
        return cdm_error_set(t->err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    t->meta_len = 0;
    start_data(t, type == 'L' ? K_LONGNAME : type == 'K' ? K_LONGLINK :
                  type == 'x' ? K_PAX : K_GLOBAL, size);
    return 0;
}

/* Finish the header of an entry: the name and size extended headers gave, the sparse map. */
static int entry_header(struct tar *t)
{
    const uint8_t *h = t->block;
    bool posix = memcmp(h + 257, "ustar\0", 6) == 0;
    uint64_t size;
    (void)parse_num(h + 124, 12, &size);        /* checked by header_block */
    if (t->pax_size_set)
        size = t->pax_size;
    char raw[NAME_CAP + 260];
    if (t->pax_sparse_name != NULL)
        copy_cut(raw, sizeof raw, t->pax_sparse_name);
    else if (t->pax_path != NULL)
        copy_cut(raw, sizeof raw, t->pax_path);
    else if (t->long_name != NULL)
        copy_cut(raw, sizeof raw, t->long_name);
    else
        header_name(h, posix, raw);
    uint8_t type = h[156];
    t->sparse = SP_NONE;
    if (type == 'S') {
        t->n_map = 0;
        if (parse_num(h + 483, 12, &t->realsize) < 0)
            return bad(t, "a malformed sparse size");
        int rc = old_sparse(t, h + 386, 4);
        if (rc < 0)
            return rc;
        t->sparse = SP_OLD;
        t->ext_more = h[482] != 0;
    } else if (t->pax_sparse != SP_NONE && (type == '0' || type == '\0' || type == '7')) {
        if (!t->pax_realsize_set || t->pax_offset_pending)
            return bad(t, "a pax sparse member without its size or with an unpaired offset");
        t->realsize = t->pax_realsize;
        t->sparse = t->pax_sparse;
        if (t->sparse == SP_PAX1)
            t->n_map = 0;
    }
    t->map_done = false;
    t->map_bytes = t->map_num = t->map_count = t->map_numbers = 0;
    t->map_digits = 0;
    t->map_count_read = false;
    t->seg_left = 0;
    /* Old sparse members may need extension blocks first: keep the name and size. */
    copy_cut(t->meta_name, sizeof t->meta_name, raw);
    t->meta_size = size;
    t->meta_type = type;
    reset_meta(t);
    if (t->sparse == SP_OLD && t->ext_more) {
        t->state = ST_SPARSE_EXT;
        return 0;
    }
    return entry(t, t->meta_name, type, size);
}

static int process_block(struct tar *t)
{
    if (t->state == ST_SPARSE_EXT) {
        int rc = old_sparse(t, t->block, 21);
        if (rc < 0)
            return rc;
        if (t->block[504] != 0)
            return 0;       /* another extension block follows */
        t->state = ST_HEADER;
        return entry(t, t->meta_name, t->meta_type, t->meta_size);
    }
    int rc = header_block(t);
    return rc == 1 ? entry_header(t) : rc;
}

/* The data of an 'L', 'K', 'x' or 'g' entry is complete. */
static int meta_end(struct tar *t)
{
    int rc = 0;
    if (t->kind == K_LONGNAME) {
        size_t n = strnlen((const char *)t->meta, t->meta_len);
        rc = set_str(t, &t->long_name, (const char *)t->meta, n);
    } else if (t->kind == K_PAX) {
        t->n_map = 0;
        rc = parse_pax(t, false);
    } else if (t->kind == K_GLOBAL) {
        rc = parse_pax(t, true);
    }
    free(t->meta);
    t->meta = NULL;
    t->meta_len = 0;
    return rc;
}

static int data(struct tar *t, const uint8_t *buf, size_t len)
{
    switch (t->kind) {
    case K_MEMBER:
        return member_data(t, buf, len);
    case K_LONGNAME:
    case K_LONGLINK:
    case K_PAX:
    case K_GLOBAL:
        memcpy(t->meta + t->meta_len, buf, len);
        t->meta_len += len;
        return 0;
    default:
        return 0;
    }
}

static int data_end(struct tar *t)
{
    if (t->kind == K_MEMBER)
        return member_end(t);
    if (t->kind != K_SKIP)
        return meta_end(t);
    return 0;
}

static int tar_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct tar *t = (struct tar *)s;
    if (len > t->limit - t->total)
        return cdm_error_set(t->err, CDM_SIDE_TARGET, -CDM_ETOOSMALL,
                             "the layer's archive is larger than %llu bytes (the image's bound "
                             "and 1 GiB for other files)", ULL(t->limit));
    int rc = 0;
    while (rc == 0 && len > 0) {
        size_t n;
        switch (t->state) {
        case ST_HEADER:
        case ST_SPARSE_EXT:
            n = CDM_MIN(len, BLOCK - t->fill);
            memcpy(t->block + t->fill, buf, n);
            t->fill += n;
            t->total += n;
            if (t->fill == BLOCK) {
                t->fill = 0;
                rc = process_block(t);
            }
            break;
        case ST_DATA:
            n = (size_t)CDM_MIN((uint64_t)len, t->left);
            rc = data(t, buf, n);
            t->left -= n;
            t->total += n;
            if (rc == 0 && t->left == 0) {
                t->state = t->pad > 0 ? ST_PAD : ST_HEADER;
                rc = data_end(t);
            }
            break;
        case ST_PAD:
            n = (size_t)CDM_MIN((uint64_t)len, t->pad);
            t->pad -= n;
            t->total += n;
            if (t->pad == 0)
                t->state = ST_HEADER;
            break;
        default:    /* ST_END: only the zeros that pad the last record may follow */
            n = len;
            if (!all_zero(buf, n))
                return bad(t, "data after the end-of-archive block");
            t->total += n;
            break;
        }
        buf += n;
        len -= n;
    }
    return rc;
}

static int tar_end(struct cdm_sink *s, struct cdm_stream_result *res)
{
    struct tar *t = (struct tar *)s;
    int rc = 0;
    if (t->total == 0)
        rc = bad(t, "the layer is empty");
    else if (!t->ended_marker)
        rc = bad(t, "the archive is truncated (%s after %u entries)",
                 t->state == ST_DATA ? "inside an entry's data" : "no end-of-archive block",
                 t->entries);
    else if (t->found && !t->member_done)
        rc = bad(t, "the image's member is incomplete");
    else if (t->found && t->n_extra > 0)
        rc = cdm_error_set(t->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                           "the layer holds more than one file under %s/: %s (the image) and "
                           "%s%s", t->dir, t->member, t->extra,
                           t->n_extra > 1 ? " and others" : "");
    if (res != NULL) {
        if (t->found) {
            res->format = t->inner_res.format;
            res->image_size = t->inner_res.image_size;
            res->peak_held = t->inner_res.peak_held;
            res->tar_compression = t->inner_res.compression;
            res->tar_member_size = t->sparse != SP_NONE ? t->realsize : t->pos;
        }
        res->bytes_out = t->total;
        res->tar_found = t->found;
        res->tar_hidden = t->hidden;
        res->tar_entries = t->entries;
        copy_cut(res->tar_member, sizeof res->tar_member, t->member);
        copy_cut(res->tar_names, sizeof res->tar_names, t->names);
    }
    return rc;
}

static void tar_destroy(struct cdm_sink *s)
{
    struct tar *t = (struct tar *)s;
    if (t->inner != NULL)
        t->inner->destroy(t->inner);
    reset_meta(t);
    free(t->meta);
    free(t->map);
    free(t->skip);
    free(t);
}

int cdm_tar_new(cdm_writer *w, const struct cdm_stream_opts *opts, uint64_t limit,
                struct cdm_error *err, struct cdm_sink **out)
{
    *out = NULL;
    struct tar *t = calloc(1, sizeof *t);
    if (t == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    t->sink = (struct cdm_sink){.push = tar_push, .end = tar_end, .destroy = tar_destroy};
    t->w = w;
    t->opts = *opts;
    t->opts.tar_dir = t->opts.tar_skip = NULL;
    t->opts.compression = CDM_COMPRESSION_AUTO;
    t->err = err;
    t->limit = limit;
    char dir[NAME_CAP + 1];
    long n = normalise(opts->tar_dir, dir);
    if (n <= 0 || (size_t)n >= sizeof t->dir) {
        free(t);
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "bad archive directory \"%s\"",
                             opts->tar_dir);
    }
    memcpy(t->dir, dir, (size_t)n + 1);
    t->dir_len = (size_t)n;
    const char *skip = opts->tar_skip != NULL ? opts->tar_skip : "";
    size_t sl = strlen(skip);
    t->skip = malloc(sl + 3);
    if (t->skip == NULL) {
        free(t);
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    }
    t->skip[0] = '\n';
    memcpy(t->skip + 1, skip, sl);
    t->skip[sl + 1] = '\n';
    t->skip[sl + 2] = '\0';
    *out = &t->sink;
    return 0;
}
