/* test_qcow2_stream.c -- the streaming QCOW2 converter, driven directly through its sink:
 * images made with qemu-img and qemu-io (converted, compressed with zlib and zstd, extended
 * L2 entries, cluster sizes from 512 bytes to 2 MiB, zero clusters, data placed before its L2
 * table) are pushed in random chunk sizes and compared with qemu-img convert -O raw; hostile
 * and truncated images must fail with a message.  Skipped when qemu-img is missing. */
#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "stream.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define L2E_MASK 0x00fffffffffffe00ull

static char dir[] = "/tmp/cdm-qstream-XXXXXX";
static unsigned seed = 12345;

static void sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[2200];
    snprintf(full, sizeof full, "cd %s && (%s) >/dev/null", dir, cmd);
    if (system(full) != 0) {
        fprintf(stderr, "command failed: %s\n", cmd);
        abort();
    }
}

static char *path(const char *name)
{
    static char p[4][512];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

static uint8_t *slurp(const char *name, size_t *len)
{
    FILE *f = fopen(path(name), "rb");
    assert(f != NULL);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n + 1);
    assert(buf != NULL);
    assert(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void spit(const char *name, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(path(name), "wb");
    assert(f != NULL);
    assert(fwrite(buf, 1, len, f) == len);
    fclose(f);
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

struct outcome {
    int rc;
    struct cdm_stream_result res;
    char msg[CDM_ERRMSG_MAX];
};

/* Stream IMG (LEN bytes, of virtual size VSIZE) onto a target in chunks of random size up to
 * MAX_CHUNK, with MEM_LIMIT; the target is pre-filled with garbage unless KNOWN_ZERO. */
static struct outcome stream(const uint8_t *img, size_t len, uint64_t vsize, uint64_t mem_limit,
                             bool known_zero, size_t max_chunk)
{
    struct outcome o;
    memset(&o, 0, sizeof o);
    int fd = open(path("out.raw"), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert(fd >= 0);
    if (!known_zero) {
        uint8_t junk[65536];
        memset(junk, 0xa5, sizeof junk);
        for (uint64_t off = 0; off < vsize; off += sizeof junk)
            assert(pwrite(fd, junk, (size_t)CDM_MIN(sizeof junk, vsize - off), (off_t)off) > 0);
    } else {
        assert(ftruncate(fd, (off_t)vsize) == 0);
    }
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    struct cdm_writer_opts wo = {.size = vsize,
                                 .flags = CDM_COPY_NO_SYNC |
                                          (known_zero ? CDM_COPY_TARGET_IS_ZERO : 0)};
    cdm_writer *w;
    assert(cdm_writer_open(ctx, fd, -1, &wo, &w) == 0);
    struct cdm_error err = {0};
    struct cdm_sink *sink;
    assert(cdm_qcow2_stream_new(w, mem_limit, &err, &sink) == 0);
    size_t pos = 0;
    int rc = 0;
    while (pos < len && rc == 0) {
        size_t n = 1 + (size_t)rand_r(&seed) % max_chunk;
        n = n > len - pos ? len - pos : n;
        rc = sink->push(sink, img + pos, n);
        pos += n;
    }
    if (rc == 0)
        rc = sink->end(sink, &o.res);
    else
        assert(sink->push(sink, img, 1) == rc);     /* a failed sink stays failed */
    assert(rc == 0 || err.msg[0] != '\0');
    o.rc = rc;
    snprintf(o.msg, sizeof o.msg, "%s", err.msg);
    sink->destroy(sink);
    assert(cdm_writer_finish(w, NULL) == 0);
    cdm_writer_free(w);
    cdm_ctx_free(ctx);
    close(fd);
    return o;
}

/* Convert NAME with qemu-img and with the stream; both must agree. */
static void check_same(const char *name, uint64_t mem_limit, size_t max_chunk)
{
    sh("qemu-img convert -O raw %s ref.raw", name);
    size_t len, rlen;
    uint8_t *img = slurp(name, &len);
    uint8_t *ref = slurp("ref.raw", &rlen);
    uint64_t vsize = get64(img + 24);
    assert(rlen == vsize);
    for (int kz = 0; kz < 2; kz++) {
        struct outcome o = stream(img, len, vsize, mem_limit, kz, max_chunk);
        if (o.rc != 0) {
            fprintf(stderr, "%s: %d %s\n", name, o.rc, o.msg);
            abort();
        }
        assert(o.res.image_size == vsize && o.res.format == CDM_FORMAT_QCOW2);
        size_t olen;
        uint8_t *out = slurp("out.raw", &olen);
        assert(olen == vsize);
        if (memcmp(out, ref, olen) != 0) {
            size_t i = 0;
            while (out[i] == ref[i])
                i++;
            fprintf(stderr, "%s (known zero %d): differs at %zu\n", name, kz, i);
            abort();
        }
        free(out);
        printf("  %-28s ok (%zu bytes, peak held %llu)\n", name, len,
               (unsigned long long)o.res.peak_held);
    }
    free(img);
    free(ref);
}

/* An image made by a shell command, checked against qemu-img. */
struct image_case {
    const char *cmd;
    const char *name;
    size_t max_chunk;
};

static void check_cases(const struct image_case *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        sh("%s", c[i].cmd);
        check_same(c[i].name, 0, c[i].max_chunk);
    }
}

static struct outcome stream_file(const char *name, uint64_t mem_limit)
{
    size_t len;
    uint8_t *img = slurp(name, &len);
    struct outcome o = stream(img, len, get64(img + 24), mem_limit, false, 100000);
    free(img);
    return o;
}

static void expect_fail(struct outcome o, int rc, const char *words)
{
    printf("  -> %d: %s\n", o.rc, o.msg);
    assert(o.rc == rc);
    assert(strstr(o.msg, words) != NULL);
}

/* A patterned image: data at several places, a zeroed range, a cluster written twice. */
static void make_pattern(const char *name, const char *opts, uint64_t size)
{
    sh("qemu-img create -q -f qcow2 %s src.qcow2 %llu", opts, (unsigned long long)size);
    sh("qemu-io -c 'write -P 0x11 0 300k' -c 'write -P 0x22 1M 64k' -c 'write -z 64k 32k' "
       "-c 'write -P 0x33 %llu 70k' -c 'write -P 0x44 %llu 1k' -c 'write -P 0x55 3M 4k' "
       "src.qcow2",
       (unsigned long long)(size / 2 + 512), (unsigned long long)(size - 1024));
    sh("qemu-img convert -O qcow2 %s src.qcow2 %s", opts, name);
}

static void test_converted(void)
{
    static const char *sizes[] = {"512", "4k", "64k", "2M"};
    for (unsigned i = 0; i < 4; i++) {
        char opts[64], name[64];
        snprintf(opts, sizeof opts, "-o cluster_size=%s", sizes[i]);
        snprintf(name, sizeof name, "conv-%s.qcow2", sizes[i]);
        make_pattern(name, opts, 8 * MiB);
        check_same(name, 0, 70000);
    }
    make_pattern("compat.qcow2", "-o compat=0.10", 8 * MiB);
    check_same("compat.qcow2", 0, 5000);
}

static void test_compressed(void)
{
    /* Random and patterned data: some clusters compress, others are stored plain. */
    sh("truncate -s 16M c.raw && head -c 3000000 /dev/urandom > rnd.bin && "
       "dd if=rnd.bin of=c.raw bs=64k seek=64 conv=notrunc status=none && "
       "qemu-io -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 10M 300k' c.raw && "
       "qemu-img convert -f raw -O qcow2 c.raw c.qcow2");
    static const struct image_case cases[] = {
        {"qemu-img convert -c -O qcow2 c.qcow2 cz.qcow2", "cz.qcow2", 9000},
        {"qemu-img convert -c -O qcow2 -o compression_type=zstd c.qcow2 cs.qcow2", "cs.qcow2",
         33333},
        {"qemu-img convert -c -O qcow2 -o cluster_size=4k c.qcow2 c4.qcow2", "c4.qcow2", 7777},
        /* Compressed clusters across many L2 tables: packed clusters straddle the tables. */
        {"qemu-img create -q -f qcow2 -o cluster_size=512 many.qcow2 4M && "
         "qemu-io -c 'write -P 0x17 0 4M' many.qcow2 && "
         "qemu-img convert -c -O qcow2 -o cluster_size=512 many.qcow2 manyc.qcow2",
         "manyc.qcow2", 3000},
    };
    check_cases(cases, sizeof cases / sizeof cases[0]);
}

static void test_direct_images(void)
{
    /* Written in place by qemu-io: zero clusters that keep their allocation, extended L2
     * entries with subclusters, writes in decreasing guest order. */
    static const struct image_case cases[] = {
        {"qemu-img create -q -f qcow2 d.qcow2 8M && qemu-io -c 'write -P 0x71 4M 1M' "
         "-c 'write -P 0x72 1M 1M' -c 'write -P 0x73 0 64k' -c 'write -z 4M 128k' "
         "-c 'write -z -u 1M 64k' d.qcow2",
         "d.qcow2", 50000},
        {"qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k x.qcow2 8M && "
         "qemu-io -c 'write -P 0x81 0 2k' -c 'write -P 0x82 6k 4k' -c 'write -P 0x83 64k 64k' "
         "-c 'write -z 70k 8k' -c 'write -P 0x84 5M 3k' -c 'write -z 5M 2k' x.qcow2",
         "x.qcow2", 4096},
        {"qemu-img convert -O qcow2 -o extended_l2=on,cluster_size=32k x.qcow2 x2.qcow2",
         "x2.qcow2", 4096},
        {"qemu-img create -q -f qcow2 e.qcow2 0", "e.qcow2", 100},
    };
    check_cases(cases, sizeof cases / sizeof cases[0]);
    sh("qemu-img create -q -f qcow2 big.qcow2 1T && qemu-io -c 'write -P 0x91 1000G 64k' "
       "big.qcow2");
    size_t len;
    uint8_t *img = slurp("big.qcow2", &len);
    struct outcome o = stream(img, len, get64(img + 24), 0, true, 100000);
    assert(o.rc == 0 && o.res.image_size == 1024 * 1024 * MiB);
    free(img);
}

/* Swap the first L2 table with the last data cluster it maps, so that the data before it
 * arrives first.  Returns the bytes of data that come before the table. */
static uint64_t swap_l2_and_data(uint8_t *img)
{
    unsigned cb = (unsigned)get64(img + 16);    /* bytes 20..23 */
    uint64_t cs = 1ull << cb;
    uint64_t l1 = get64(img + 40);
    uint64_t l2 = get64(img + l1) & L2E_MASK;
    uint64_t last = 0, last_i = 0;
    for (uint64_t i = 0; i < cs / 8; i++) {
        uint64_t h = get64(img + l2 + i * 8) & L2E_MASK;
        if (h > last) {
            last = h;
            last_i = i;
        }
    }
    assert(last > l2);
    uint8_t *tmp = malloc(cs);
    memcpy(tmp, img + l2, cs);
    memcpy(img + l2, img + last, cs);
    memcpy(img + last, tmp, cs);
    free(tmp);
    put64(img + l1, (get64(img + l1) & ~L2E_MASK) | last);
    put64(img + last + last_i * 8, (get64(img + last + last_i * 8) & ~L2E_MASK) | l2);
    return last - l2;
}

static void test_data_before_l2(void)
{
    sh("qemu-img create -q -f qcow2 s.qcow2 64M && qemu-io -c 'write -P 0x21 0 2M' "
       "-c 'write -P 0x22 8M 256k' s.qcow2 && qemu-img convert -O qcow2 s.qcow2 sc.qcow2");
    size_t len;
    uint8_t *img = slurp("sc.qcow2", &len);
    uint64_t ahead = swap_l2_and_data(img);
    spit("swapped.qcow2", img, len);
    sh("qemu-img check -q swapped.qcow2");
    check_same("swapped.qcow2", 0, 65536);
    check_same("swapped.qcow2", 4 * MiB, 65536);
    struct outcome o = stream(img, len, get64(img + 24), ahead / 2, false, 65536);
    expect_fail(o, -CDM_EUNSUPPORTED, "before its L2 table");
    assert(strstr(o.msg, "would have to be held") != NULL);
    free(img);
}

static void test_hostile(void)
{
    make_pattern("h.qcow2", "", 8 * MiB);
    size_t len;
    uint8_t *img = slurp("h.qcow2", &len);
    uint64_t vsize = get64(img + 24), l1 = get64(img + 40);
    uint64_t l2 = get64(img + l1) & L2E_MASK;

    /* Truncated: at every tenth of the file. */
    for (int k = 1; k < 10; k++) {
        struct outcome o = stream(img, len * (size_t)k / 10, vsize, 0, false, 10000);
        printf("  truncated at %zu -> %d: %s\n", len * (size_t)k / 10, o.rc, o.msg);
        assert(o.rc < 0);
    }
    expect_fail(stream(img, len - 1, vsize, 0, false, 10000), -EIO, "the image ended");
    /* The L1 table beyond the memory limit. */
    expect_fail(stream(img, len, vsize, l1 - 1000, false, 10000), -CDM_EUNSUPPORTED,
                "the L1 table at offset");
    /* The header cluster beyond the memory limit. */
    expect_fail(stream(img, len, vsize, 4000, false, 10000), -CDM_EUNSUPPORTED,
                "within the memory limit");

    uint8_t *bad = malloc(len);
    /* An L2 entry pointing into the L1 table, a compressed one into the header. */
    memcpy(bad, img, len);
    put64(bad + l2, 0x8000000000000000ull | l1);
    expect_fail(stream(bad, len, vsize, 0, false, 10000), -CDM_EFORMAT, "points into");
    memcpy(bad, img, len);
    put64(bad + l2, 0x4000000000000000ull | 0x100);
    expect_fail(stream(bad, len, vsize, 0, false, 10000), -CDM_EFORMAT, "header cluster");
    /* Two entries claiming the same host cluster. */
    memcpy(bad, img, len);
    put64(bad + l2 + 8 * 2, get64(bad + l2));
    expect_fail(stream(bad, len, vsize, 0, false, 10000), -CDM_EFORMAT, "claimed twice");
    /* An entry pointing at the refcount block (which arrived before). */
    memcpy(bad, img, len);
    uint64_t rt = get64(img + 48);
    put64(bad + l2 + 8 * 3, 0x8000000000000000ull | (get64(img + rt) & L2E_MASK));
    expect_fail(stream(bad, len, vsize, 0, false, 10000), -CDM_EFORMAT, "");
    /* Two L1 entries sharing an L2 table. */
    sh("qemu-img create -q -f qcow2 -o cluster_size=512 l1.qcow2 1M && "
       "qemu-io -c 'write -P 1 0 512' -c 'write -P 2 512k 512' l1.qcow2");
    size_t len2;
    uint8_t *two = slurp("l1.qcow2", &len2);
    uint64_t l1b = get64(two + 40);
    put64(two + l1b + 8 * 8, get64(two + l1b));     /* 512 B clusters: 64 entries per L2 */
    expect_fail(stream(two, len2, get64(two + 24), 0, false, 1000), -CDM_EFORMAT,
                "share the L2 table");
    free(two);
    /* Not a QCOW2 image at all; garbage after a valid magic. */
    memset(bad, 0x5a, len);
    expect_fail(stream(bad, len, vsize, 0, false, 10000), -CDM_EFORMAT, "not a QCOW2");
    memcpy(bad, img, len);
    memset(bad + 8, 0xff, 64);
    struct outcome o = stream(bad, len, vsize, 0, false, 10000);
    printf("  -> %d: %s\n", o.rc, o.msg);
    assert(o.rc < 0);
    free(bad);
    free(img);

    /* Backing file: refused. */
    sh("qemu-img create -q -f qcow2 base.qcow2 8M && "
       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
    expect_fail(stream_file("top.qcow2", 0), -CDM_EUNSAFE, "backing file");
    /* A target smaller than the virtual size. */
    img = slurp("h.qcow2", &len);
    expect_fail(stream(img, len, vsize - 512, 0, false, 10000), -CDM_ETOOSMALL,
                "virtual size");
    free(img);
}

int main(void)
{
    if (system("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1") != 0) {
        printf("qemu-img or qemu-io missing: skipped\n");
        return 0;
    }
    assert(mkdtemp(dir) != NULL);
    printf("converted images\n");
    test_converted();
    printf("compressed images\n");
    test_compressed();
    printf("images written in place\n");
    test_direct_images();
    printf("data before its L2 table\n");
    test_data_before_l2();
    printf("hostile images\n");
    test_hostile();
    sh("rm -rf %s", dir);
    printf("test_qcow2_stream: ok\n");
    return 0;
}
