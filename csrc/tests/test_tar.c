/* test_tar.c -- C-level tests of the tar stage (csrc/tar.c) inside the stream pipeline:
 * archives written here header by header (ustar with a prefix, GNU long names, pax paths and
 * sizes, base-256 sizes), sparse members written by GNU tar (old GNU, pax 0.0, 0.1 and 1.0),
 * whiteouts, several files, a gzip member inside a gzip archive, every kind of malformed
 * header, and truncation at every block and at odd cuts.  Pieces of every size from 1 byte
 * on.  Run under ASan + UBSan. */
#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>

#include "../stream.h"

#define IMG (300000u)
#define TARGET (1u << 20)
#define CAP (4u << 20)

static char dir[] = "/tmp/cdm-tar-XXXXXX";
static cdm_ctx *ctx;
static uint8_t img[IMG];

/* ---- archives written by hand ---------------------------------------------------------- */

struct ar {
    uint8_t *p;
    size_t len;
};

static uint8_t *block(struct ar *a)
{
    assert(a->len + 512 <= CAP);
    uint8_t *b = a->p + a->len;
    memset(b, 0, 512);
    a->len += 512;
    return b;
}

static void checksum(uint8_t *h)
{
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++)
        sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
}

/* A header: GNU (magic "ustar  ") or POSIX ("ustar\0" "00"); PREFIX only for POSIX. */
static uint8_t *header(struct ar *a, const char *name, const char *prefix, char type,
                       uint64_t size, bool gnu)
{
    uint8_t *h = block(a);
    memcpy(h, name, strnlen(name, 100));
    snprintf((char *)h + 100, 8, "%07o", 0644);
    snprintf((char *)h + 108, 8, "%07o", 107);
    snprintf((char *)h + 116, 8, "%07o", 107);
    snprintf((char *)h + 124, 12, "%011llo", (unsigned long long)size);
    snprintf((char *)h + 136, 12, "%011o", 0);
    h[156] = (uint8_t)type;
    if (gnu) {
        memcpy(h + 257, "ustar  ", 8);
    } else {
        memcpy(h + 257, "ustar", 6);
        memcpy(h + 263, "00", 2);
        if (prefix)
            memcpy(h + 345, prefix, strlen(prefix));
    }
    checksum(h);
    return h;
}

static void data(struct ar *a, const void *buf, size_t n)
{
    assert(a->len + n + 512 <= CAP);
    memcpy(a->p + a->len, buf, n);
    a->len += n;
    size_t pad = (512 - n % 512) % 512;
    memset(a->p + a->len, 0, pad);
    a->len += pad;
}

static void file(struct ar *a, const char *name, const void *buf, size_t n)
{
    header(a, name, NULL, '0', n, false);
    data(a, buf, n);
}

static void pax(struct ar *a, const char *records)
{
    header(a, "PaxHeaders/x", NULL, 'x', strlen(records), false);
    data(a, records, strlen(records));
}

static void finish(struct ar *a)
{
    block(a);
    block(a);
}

static struct ar new_ar(void)
{
    struct ar a = {malloc(CAP), 0};
    assert(a.p != NULL);
    return a;
}

/* ---- running ------------------------------------------------------------------------------- */

static int open_tmp(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert(fd >= 0);
    return fd;
}

struct run {
    int rc;
    struct cdm_stream_result res;
    struct cdm_error err;
    uint8_t *out;       /* TARGET bytes read back */
};

static struct run run(const uint8_t *buf, size_t len, size_t step0, const char *skip)
{
    struct run r = {0};
    int fd = open_tmp("target");
    assert(ftruncate(fd, TARGET) == 0);
    struct cdm_writer_opts wo = {.size = TARGET, .flags = CDM_COPY_NO_SYNC};
    cdm_writer *w;
    assert(cdm_writer_open(ctx, fd, -1, &wo, &w) == 0);
    struct cdm_stream_opts o = {.hash = CDM_HASH_SHA256, .tar_dir = "disk/",
                                .tar_skip = skip};
    struct cdm_pipeline *p;
    r.rc = cdm_pipeline_new(w, &o, &r.err, &p);
    assert(r.rc == 0);
    size_t pos = 0, step = step0;
    while (r.rc == 0 && pos < len) {
        size_t n = step < len - pos ? step : len - pos;
        r.rc = cdm_pipeline_push(p, buf + pos, n);
        pos += n;
        if (step0 == 0 || step0 == 1)
            step = step >= 65536 ? 1 : step * 3 + 1;
    }
    memset(&r.res, 0xa5, sizeof r.res);     /* every field of the result is an output */
    if (r.rc == 0)
        r.rc = cdm_pipeline_end(p, &r.res);
    assert(r.rc == 0 || (r.rc < 0 && r.err.msg[0] != '\0'));
    cdm_pipeline_free(p);
    if (r.rc == 0)
        assert(cdm_writer_finish(w, NULL) == 0);
    else
        cdm_writer_abort(w);
    cdm_writer_free(w);
    r.out = malloc(TARGET);
    assert(pread(fd, r.out, TARGET, 0) == TARGET);
    close(fd);
    return r;
}

static void ok_image(const struct run *r, const uint8_t *want, size_t n)
{
    if (r->rc != 0)
        fprintf(stderr, "unexpected failure: %s\n", r->err.msg);
    assert(r->rc == 0);
    assert(r->res.tar_found == 1);
    assert(r->res.format == CDM_FORMAT_RAW);
    assert(r->res.image_size == n);
    assert(memcmp(r->out, want, n) == 0);
}

static void fails(const uint8_t *buf, size_t len, const char *needle)
{
    struct run r = run(buf, len, 4096, NULL);
    if (r.rc == 0 || (needle && !strstr(r.err.msg, needle)))
        fprintf(stderr, "expected \"%s\", got rc %d: %s\n", needle ? needle : "", r.rc,
                r.err.msg);
    assert(r.rc < 0);
    assert(needle == NULL || strstr(r.err.msg, needle) != NULL);
    free(r.out);
}

/* ---- the tests ------------------------------------------------------------------------------ */

static void test_ustar(void)
{
    struct ar a = new_ar();
    header(&a, "./", NULL, '5', 0, false);
    file(&a, "etc/hostname", "x\n", 2);
    header(&a, "./disk/", NULL, '5', 0, false);
    file(&a, "./disk//disk.img", img, IMG);
    file(&a, "README", "hello", 5);
    finish(&a);
    a.len += 5 * 512;               /* zeros padding the record */
    memset(a.p + a.len - 5 * 512, 0, 5 * 512);
    static const size_t steps[] = {1, 511, 512, 513, 65536, CAP};
    for (size_t i = 0; i < sizeof steps / sizeof *steps; i++) {
        struct run r = run(a.p, a.len, steps[i], NULL);
        ok_image(&r, img, IMG);
        assert(strcmp(r.res.tar_member, "disk/disk.img") == 0);
        assert(r.res.tar_entries == 5 && r.res.tar_hidden == 0);
        assert(r.res.bytes_in == a.len && r.res.bytes_out == a.len);
        assert(r.res.compression == CDM_COMPRESSION_NONE);
        assert(r.res.tar_compression == CDM_COMPRESSION_NONE);
        assert(r.res.tar_member_size == IMG && r.res.digest_len == 32);
        free(r.out);
    }
    /* the skip list hides it */
    struct run r = run(a.p, a.len, 4096, "other\ndisk.img");
    assert(r.rc == 0 && r.res.tar_found == 0);
    free(r.out);
    free(a.p);
}

/* Names: a ustar prefix, a GNU long name, a pax path; a pax size over the header's. */
static void test_names(void)
{
    char longname[300];
    snprintf(longname, sizeof longname, "disk/%0250d.img", 7);
    struct ar a = new_ar();
    header(&a, "img.raw", "./disk", '0', IMG, false);
    data(&a, img, IMG);
    finish(&a);
    struct run r = run(a.p, a.len, 1, NULL);
    ok_image(&r, img, IMG);
    assert(strcmp(r.res.tar_member, "disk/img.raw") == 0);
    free(r.out);

    a.len = 0;
    header(&a, "././@LongLink", NULL, 'L', strlen(longname) + 1, true);
    data(&a, longname, strlen(longname) + 1);
    header(&a, "disk/short", NULL, '0', IMG, true);
    data(&a, img, IMG);
    finish(&a);
    r = run(a.p, a.len, 777, NULL);
    ok_image(&r, img, IMG);
    assert(strncmp(r.res.tar_member, longname, 200) == 0);
    free(r.out);

    char rec[600];
    size_t body = strlen(longname) + strlen(" path=\n");
    size_t len = body + 3;                       /* three digits of length */
    snprintf(rec, sizeof rec, "%zu path=%s\n%d size=%u\n", len, longname,
             (int)(strlen(" size=\n") + 6 + 2), IMG);
    a.len = 0;
    pax(&a, rec);
    header(&a, "disk/ignored", NULL, '0', 1, false);    /* the pax size wins */
    data(&a, img, IMG);
    finish(&a);
    r = run(a.p, a.len, 4096, NULL);
    ok_image(&r, img, IMG);
    assert(strncmp(r.res.tar_member, longname, 200) == 0);
    free(r.out);

    /* a base-256 size */
    a.len = 0;
    uint8_t *h = header(&a, "disk/b256", NULL, '0', 0, true);
    memset(h + 124, 0, 12);
    h[124] = 0x80;
    h[133] = (IMG >> 16) & 0xff;
    h[134] = (IMG >> 8) & 0xff;
    h[135] = IMG & 0xff;
    checksum(h);
    data(&a, img, IMG);
    finish(&a);
    r = run(a.p, a.len, 65536, NULL);
    ok_image(&r, img, IMG);
    free(r.out);
    free(a.p);
}

/* Whiteouts, several files, a file in a subdirectory, no file. */
static void test_layout(void)
{
    struct ar a = new_ar();
    file(&a, "disk/a.img", img, 1000);
    file(&a, "disk/b.img", img, 1000);
    finish(&a);
    struct run r = run(a.p, a.len, 4096, NULL);
    assert(r.rc < 0 && strstr(r.err.msg, "disk/a.img") && strstr(r.err.msg, "disk/b.img"));
    free(r.out);

    a.len = 0;
    header(&a, "disk/sub/", NULL, '5', 0, false);
    file(&a, "disk/sub/x.img", img, 1000);
    header(&a, "disk/link", NULL, '2', 0, false);
    file(&a, "disk/.wh.old.img", "", 0);
    finish(&a);
    r = run(a.p, a.len, 4096, NULL);
    assert(r.rc == 0 && r.res.tar_found == 0 && r.res.tar_hidden == 0);
    assert(strcmp(r.res.tar_names, "sub/\nsub/x.img\nlink\n.wh.old.img\n") == 0);
    assert(r.res.tar_entries == 4);
    free(r.out);

    static const char *const hiders[] = {".wh.disk", "disk/.wh..wh..opq", ".wh..wh..opq",
                                         "./.wh.disk"};
    for (size_t i = 0; i < 4; i++) {
        a.len = 0;
        file(&a, hiders[i], "", 0);
        finish(&a);
        r = run(a.p, a.len, 4096, NULL);
        assert(r.rc == 0 && r.res.tar_found == 0 && r.res.tar_hidden == 1);
        free(r.out);
    }
    /* a regular file where the directory was */
    a.len = 0;
    file(&a, "disk", "x", 1);
    finish(&a);
    r = run(a.p, a.len, 4096, NULL);
    assert(r.rc == 0 && r.res.tar_hidden == 1);
    free(r.out);
    /* an opaque directory that also brings its own disk: found and hidden */
    a.len = 0;
    file(&a, "disk/.wh..wh..opq", "", 0);
    file(&a, "disk/new.img", img, IMG);
    finish(&a);
    r = run(a.p, a.len, 4096, NULL);
    ok_image(&r, img, IMG);
    assert(r.res.tar_hidden == 1);
    free(r.out);
    free(a.p);
}

static size_t gzip(const uint8_t *in, size_t n, uint8_t *out, size_t cap)
{
    z_stream z = {0};
    assert(deflateInit2(&z, 1, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    assert(deflate(&z, Z_FINISH) == Z_STREAM_END);
    size_t len = cap - z.avail_out;
    deflateEnd(&z);
    return len;
}

/* A gzip member inside a gzip-compressed archive. */
static void test_gzip(void)
{
    uint8_t *gz = malloc(CAP);
    size_t n = gzip(img, IMG, gz, CAP);
    struct ar a = new_ar();
    file(&a, "disk/disk.img.gz", gz, n);
    finish(&a);
    size_t m = gzip(a.p, a.len, gz, CAP);
    struct run r = run(gz, m, 1, NULL);
    ok_image(&r, img, IMG);
    assert(r.res.compression == CDM_COMPRESSION_GZIP);
    assert(r.res.tar_compression == CDM_COMPRESSION_GZIP);
    assert(r.res.bytes_in == m && r.res.bytes_out == a.len);
    free(r.out);
    free(gz);
    free(a.p);
}

/* Sparse members written by GNU tar in each sparse format. */
static void test_sparse(void)
{
    char cmd[1024], path[300];
    snprintf(path, sizeof path, "%s/src/disk", dir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cd %s && truncate -s %u sp.img && "
             "printf AAAA | dd of=sp.img bs=1 seek=4096 conv=notrunc status=none && "
             "head -c 70000 /dev/urandom | dd of=sp.img bs=1 seek=200000 conv=notrunc "
             "status=none && printf Z | dd of=sp.img bs=1 seek=%u conv=notrunc status=none",
             path, path, TARGET - 4096, TARGET - 4097);
    assert(system(cmd) == 0);
    uint8_t *want = malloc(TARGET);
    snprintf(path, sizeof path, "%s/src/disk/sp.img", dir);
    int fd = open(path, O_RDONLY);
    assert(pread(fd, want, TARGET - 4096, 0) == TARGET - 4096);
    close(fd);
    static const char *const formats[] = {
        "--format=gnu", "--format=pax --sparse-version=0.0", "--format=pax --sparse-version=0.1",
        "--format=pax --sparse-version=1.0"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(cmd, sizeof cmd, "cd %s/src && tar --sparse %s -cf ../sp.tar disk", dir,
                 formats[i]);
        assert(system(cmd) == 0);
        snprintf(path, sizeof path, "%s/sp.tar", dir);
        fd = open(path, O_RDONLY);
        struct stat st;
        assert(fstat(fd, &st) == 0 && st.st_size < (off_t)CAP);
        uint8_t *buf = malloc((size_t)st.st_size);
        assert(pread(fd, buf, (size_t)st.st_size, 0) == st.st_size);
        close(fd);
        struct run r = run(buf, (size_t)st.st_size, i % 2 ? 1 : 65536, NULL);
        if (r.rc != 0)
            fprintf(stderr, "%s: %s\n", formats[i], r.err.msg);
        ok_image(&r, want, TARGET - 4096);
        assert(strcmp(r.res.tar_member, "disk/sp.img") == 0);
        free(r.out);
        /* cut anywhere: an error, never a crash */
        size_t end = (size_t)st.st_size;    /* the end-of-archive block: after the last data */
        while (end > 0 && buf[end - 1] == 0)
            end--;
        end = (end + 511) / 512 * 512;
        for (size_t cut = 1; cut < end + 512; cut += 333) {
            r = run(buf, cut, 4096, NULL);
            assert(r.rc < 0);
            free(r.out);
        }
        free(buf);
    }
    free(want);
}

static void test_malformed(void)
{
    struct ar a = new_ar();
    file(&a, "disk/x.img", img, 2000);
    finish(&a);
    size_t good = a.len;
    uint8_t *copy = malloc(CAP);
    /* truncation at every block and at odd cuts */
    for (size_t cut = 0; cut < good; cut += (cut % 512 == 0 ? 7 : 505)) {
        if (cut >= good - 512)
            break;      /* cuts after the first end block are complete archives */
        struct run r = run(a.p, cut, 100, NULL);
        assert(r.rc < 0);
        free(r.out);
    }
    struct { size_t off; uint8_t byte; const char *msg; } flips[] = {
        {148, '9', "checksum"},           /* not octal */
        {0, 'y', "checksum is wrong"},
        {124, 'x', "checksum"},           /* size not a number (checksum first) */
        {257, 'X', "checksum"},
    };
    for (size_t i = 0; i < sizeof flips / sizeof *flips; i++) {
        memcpy(copy, a.p, good);
        copy[flips[i].off] = flips[i].byte;
        fails(copy, good, flips[i].msg);
    }
    /* valid checksums over bad fields */
    memcpy(copy, a.p, good);
    copy[124] = 'x';
    checksum(copy);
    fails(copy, good, "size field");
    memcpy(copy, a.p, good);
    memset(copy + 257, 0, 8);
    checksum(copy);
    fails(copy, good, "v7");
    memcpy(copy, a.p, good);
    memset(copy + 124, 0xff, 12);
    checksum(copy);
    fails(copy, good, "size field");
    /* data after the end */
    memcpy(copy, a.p, good);
    memset(copy + good, 0, 512);
    copy[good + 100] = 1;
    fails(copy, good + 512, "after the end-of-archive");
    /* escaping names, bad pax records, oversized extended headers */
    struct ar b = new_ar();
    file(&b, "../disk/x.img", img, 10);
    finish(&b);
    fails(b.p, b.len, "leaves the archive's root");
    b.len = 0;
    pax(&b, "10 path=a\n");     /* length says 10, record is 10: fine */
    pax(&b, "99 path=a\n");
    file(&b, "disk/x", img, 10);
    finish(&b);
    fails(b.p, b.len, "pax record");
    b.len = 0;
    pax(&b, "12 size=1x2\n");
    file(&b, "disk/x", img, 10);
    finish(&b);
    fails(b.p, b.len, "pax size");
    b.len = 0;
    uint8_t *h = header(&b, "big", NULL, 'x', 2u << 20, false);
    (void)h;
    finish(&b);
    fails(b.p, b.len, "extended header");
    b.len = 0;
    fails(b.p, 0, "empty");
    /* a sparse map that lies */
    b.len = 0;
    pax(&b, "22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n28 GNU.sparse.realsize=1000\n");
    header(&b, "disk/s", NULL, '0', 1024, false);
    char map[1024] = "1\n0\n900\n";
    data(&b, map, 1024);
    finish(&b);
    fails(b.p, b.len, "sparse map");
    b.len = 0;
    pax(&b, "26 GNU.sparse.map=0,5,2,5\n28 GNU.sparse.realsize=1000\n");
    header(&b, "disk/s", NULL, '0', 10, false);
    data(&b, img, 10);
    finish(&b);
    fails(b.p, b.len, "overlap");
    free(b.p);
    free(copy);
    free(a.p);
}

/* A layer without a disk: success, nothing found, no image (no stale result fields). */
static void test_no_disk(void)
{
    struct ar a = new_ar();
    file(&a, "etc/hostname", "node\n", 5);
    finish(&a);
    struct run r = run(a.p, a.len, 4096, NULL);
    assert(r.rc == 0);
    assert(!r.res.tar_found);
    assert(r.res.image_size == 0 && r.res.peak_held == 0 && r.res.bytes_in == a.len);
    free(r.out);
    free(a.p);
}

int main(void)
{
    assert(mkdtemp(dir) != NULL);
    assert(cdm_ctx_new(&ctx) == 0);
    unsigned seed = 11;
    for (size_t i = 0; i < IMG; i++) {
        seed = seed * 1103515245u + 12345u;
        img[i] = (i / 20000) % 3 == 1 ? 0 : (uint8_t)(seed >> 16);
    }
    test_ustar();
    test_names();
    test_layout();
    test_gzip();
    test_sparse();
    test_malformed();
    test_no_disk();
    cdm_ctx_free(ctx);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert(system(cmd) == 0);
    printf("test_tar: ok\n");
    return 0;
}
