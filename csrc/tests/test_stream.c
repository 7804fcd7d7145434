/* test_stream.c -- C-level tests of the stream pipeline: gzip (two members), xz and zstd
 * data made here, pushed in pieces of every size from 1 byte to 1 MiB onto a writer and
 * checked byte for byte; truncation at every cut of a small stream, the output bound, and
 * the digests of known inputs.  Run under ASan + UBSan. */
#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lzma.h>
#include <zlib.h>
#ifdef CDM_HAVE_ZSTD
#include <zstd.h>
#endif

#include "../stream.h"

#define MiB (1u << 20)
#define SIZE (3 * MiB + 777)

static char dir[] = "/tmp/cdm-stream-XXXXXX";

static int open_tmp(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert(fd >= 0);
    return fd;
}

/* Pseudo-random bytes with runs of zeros. */
static void fill(uint8_t *p, size_t n)
{
    unsigned seed = 7;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (i / 65536) % 3 == 1 ? 0 : (uint8_t)(seed >> 16);
    }
}

static size_t gzip_member(const uint8_t *in, size_t n, uint8_t *out, size_t cap)
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

static size_t make(int kind, const uint8_t *in, size_t n, uint8_t *out, size_t cap)
{
    size_t len = 0;
    if (kind == CDM_COMPRESSION_GZIP) {
        len = gzip_member(in, n / 2, out, cap);
        len += gzip_member(in + n / 2, n - n / 2, out + len, cap - len);
    } else if (kind == CDM_COMPRESSION_XZ) {
        assert(lzma_easy_buffer_encode(0, LZMA_CHECK_CRC64, NULL, in, n, out, &len, cap) ==
               LZMA_OK);
    } else {
#ifdef CDM_HAVE_ZSTD
        len = ZSTD_compress(out, cap, in, n, 1);
        assert(!ZSTD_isError(len));
#endif
    }
    return len;
}

/* Push LEN bytes of BUF in pieces growing from 1 byte; the pipeline's result code. */
static int run(cdm_writer *w, const struct cdm_stream_opts *o, const uint8_t *buf, size_t len,
               struct cdm_stream_result *res, struct cdm_error *err)
{
    struct cdm_pipeline *p;
    int rc = cdm_pipeline_new(w, o, err, &p);
    assert(rc == 0);
    size_t pos = 0, step = 1;
    while (rc == 0 && pos < len) {
        size_t n = step < len - pos ? step : len - pos;
        rc = cdm_pipeline_push(p, buf + pos, n);
        pos += n;
        step = step >= MiB ? 1 : step * 3 + 1;
    }
    if (rc == 0)
        rc = cdm_pipeline_end(p, res);
    assert(rc != 0 || cdm_pipeline_bytes_in(p) == len);
    cdm_pipeline_free(p);
    return rc;
}

static cdm_writer *writer(cdm_ctx *ctx, int fd, uint64_t size)
{
    struct cdm_writer_opts wo = {.size = size, .flags = CDM_COPY_NO_SYNC};
    cdm_writer *w;
    assert(ftruncate(fd, (off_t)size) == 0);
    assert(cdm_writer_open(ctx, fd, -1, &wo, &w) == 0);
    return w;
}

static void test_roundtrip(cdm_ctx *ctx, const uint8_t *img, const uint8_t *packed, size_t n,
                           int kind)
{
    int fd = open_tmp("t");
    cdm_writer *w = writer(ctx, fd, SIZE);
    struct cdm_stream_opts o = {.hash = CDM_HASH_SHA256};
    struct cdm_stream_result res;
    struct cdm_error err = {0};
    int rc = run(w, &o, packed, n, &res, &err);
    if (rc != 0)
        fprintf(stderr, "%s: %s\n", cdm_compression_name(kind), err.msg);
    assert(rc == 0);
    assert(cdm_writer_finish(w, NULL) == 0);
    cdm_writer_free(w);
    assert(res.compression == kind && res.format == CDM_FORMAT_RAW);
    assert(res.bytes_in == n && res.bytes_out == SIZE && res.image_size == SIZE);
    assert(res.digest_len == 32);
    uint8_t *back = malloc(SIZE);
    size_t got;
    assert(pread(fd, back, SIZE, 0) == (ssize_t)SIZE);
    (void)got;
    assert(memcmp(back, img, SIZE) == 0);
    free(back);
    close(fd);
}

static void test_truncated(cdm_ctx *ctx, const uint8_t *packed, size_t n, int kind)
{
    int fd = open_tmp("t");
    for (size_t cut = 0; cut < n; cut += 1 + cut / 3) {
        cdm_writer *w = writer(ctx, fd, SIZE);
        struct cdm_stream_opts o = {.compression = kind};
        struct cdm_error err = {0};
        int rc = run(w, &o, packed, cut, NULL, &err);
        if (rc != -CDM_EFORMAT || strstr(err.msg, cut == 0 ? "empty" : "truncated") == NULL)
            fprintf(stderr, "%s cut %zu: %d %s\n", cdm_compression_name(kind), cut, rc, err.msg);
        assert(rc == -CDM_EFORMAT);
        assert(err.rc == rc && err.side == CDM_SIDE_SOURCE);
        assert(strstr(err.msg, cut == 0 ? "empty" : "truncated") != NULL ||
               strstr(err.msg, "corrupt") != NULL);
        cdm_writer_free(w);
    }
    close(fd);
}

static void test_bound(cdm_ctx *ctx, const uint8_t *packed, size_t n)
{
    int fd = open_tmp("small");
    cdm_writer *w = writer(ctx, fd, SIZE - 1);
    struct cdm_stream_opts o = {.format = CDM_FORMAT_RAW};
    struct cdm_error err = {0};
    assert(run(w, &o, packed, n, NULL, &err) == -CDM_ETOOSMALL);
    assert(strstr(err.msg, "larger than the target") != NULL);
    cdm_writer_free(w);
    close(fd);
}

static void test_digests(void)
{
    static const char *const hex[] = {
        [CDM_HASH_MD5] = "900150983cd24fb0d6963f7d28e17f72",
        [CDM_HASH_SHA1] = "a9993e364706816aba3e25717850c26c9cd0d89d",
        [CDM_HASH_SHA256] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    };
    for (int a = CDM_HASH_MD5; a <= CDM_HASH_SHA256; a++) {
        struct cdm_hasher h;
        struct cdm_error err = {0};
        uint8_t out[64];
        uint32_t len;
        char text[129] = "";
        assert(cdm_hasher_init(&h, a, &err) == 0);
        assert(cdm_hasher_update(&h, "a", 1, &err) == 0);
        assert(cdm_hasher_update(&h, "bc", 2, &err) == 0);
        assert(cdm_hasher_final(&h, out, &len, &err) == 0);
        for (uint32_t i = 0; i < len; i++)
            snprintf(text + 2 * i, 3, "%02x", out[i]);
        assert(strcmp(text, hex[a]) == 0);
        cdm_hasher_fini(&h);
    }
    struct cdm_hasher h;
    struct cdm_error err = {0};
    assert(cdm_hasher_init(&h, 42, &err) == -EINVAL);
    cdm_hasher_fini(&h);
}

/* An expected digest: the right bytes pass; corrupted bytes that stop decoding are read to
 * their end and reported as -CDM_EDIGEST naming the decoding failure; bytes that do not
 * decode but have the right digest keep their -CDM_EFORMAT; more bytes than expected stop.
 * (zstd frames made without a content checksum decode a flipped bit without noticing.) */
static void test_expect(cdm_ctx *ctx, const uint8_t *packed, size_t n, int kind)
{
    int undetected = kind == CDM_COMPRESSION_ZSTD ? 0 : -CDM_EFORMAT;
    int fd = open_tmp("t");
    uint8_t *bad = malloc(n);
    memcpy(bad, packed, n);
    bad[n / 3] ^= 0x10;      /* inside compressed data (n / 2 may be a gzip header field) */
    uint8_t good_digest[64], bad_digest[64];
    uint32_t len;
    struct cdm_error err = {0};
    struct cdm_hasher h;
    for (int i = 0; i < 2; i++) {
        assert(cdm_hasher_init(&h, CDM_HASH_SHA256, &err) == 0);
        assert(cdm_hasher_update(&h, i ? bad : packed, n, &err) == 0);
        assert(cdm_hasher_final(&h, i ? bad_digest : good_digest, &len, &err) == 0);
        cdm_hasher_fini(&h);
    }
    struct {
        const uint8_t *bytes, *expect;
        uint64_t size;
        int rc;
        const char *text;
    } cases[] = {
        {bad, NULL, n, undetected, NULL},
        {packed, good_digest, n, 0, NULL},
        {packed, good_digest, 0, 0, NULL},
        {packed, bad_digest, n, -CDM_EDIGEST, "have digest"},
        {bad, good_digest, n, -CDM_EDIGEST,
         undetected ? "decoding stopped at a corrupted byte" : "have digest"},
        {bad, bad_digest, n, undetected, NULL},
        {packed, good_digest, n - 1, -CDM_EDIGEST, "more than the"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cdm_writer *w = writer(ctx, fd, SIZE);
        struct cdm_stream_opts o = {.hash = CDM_HASH_SHA256, .expect_digest = cases[i].expect,
                                    .expect_size = cases[i].size};
        struct cdm_stream_result res;
        cdm_error_clear(&err);
        int rc = run(w, &o, cases[i].bytes, n, &res, &err);
        if (rc != cases[i].rc)
            fprintf(stderr, "expect case %zu: %d %s\n", i, rc, err.msg);
        assert(rc == cases[i].rc);
        if (cases[i].text != NULL && strstr(err.msg, cases[i].text) == NULL)
            fprintf(stderr, "expect case %zu: %s\n", i, err.msg);
        assert(cases[i].text == NULL || strstr(err.msg, cases[i].text) != NULL);
        cdm_writer_free(w);
    }
    free(bad);
    close(fd);
}

int main(void)
{
    assert(mkdtemp(dir) != NULL);
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    uint8_t *img = malloc(SIZE);
    size_t cap = SIZE + SIZE / 2 + 65536;
    uint8_t *packed = malloc(cap);
    fill(img, SIZE);
    test_digests();
    int kinds[] = {CDM_COMPRESSION_GZIP, CDM_COMPRESSION_XZ,
#ifdef CDM_HAVE_ZSTD
                   CDM_COMPRESSION_ZSTD,
#endif
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        size_t n = make(kinds[i], img, SIZE, packed, cap);
        test_roundtrip(ctx, img, packed, n, kinds[i]);
        test_bound(ctx, packed, n);
        test_expect(ctx, packed, n, kinds[i]);
        size_t small = make(kinds[i], img, 20000, packed, cap);
        test_truncated(ctx, packed, small, kinds[i]);
    }
    test_roundtrip(ctx, img, img, SIZE, CDM_COMPRESSION_NONE);
    free(img);
    free(packed);
    cdm_ctx_free(ctx);
    const char *names[] = {"t", "small"};
    for (size_t i = 0; i < 2; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    assert(rmdir(dir) == 0);
    printf("test_stream: ok\n");
    return 0;
}
