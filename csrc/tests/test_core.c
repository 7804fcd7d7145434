/* test_core.c -- C-level tests of the copy engine: is_zero, extent scans, the zeroing
 * cascade and a sparse file-to-file copy, checked byte for byte.  Run under ASan + UBSan. */
#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cdimover.h"

#define MiB (1u << 20)

static char dir[] = "/tmp/cdm-test-XXXXXX";

static int open_tmp(const char *name, int flags)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, flags | O_CREAT | O_CLOEXEC, 0600);
    assert(fd >= 0);
    return fd;
}

static void test_is_zero(void)
{
    static unsigned char buf[70000];
    memset(buf, 0, sizeof buf);
    for (size_t len = 0; len < 100; len++)
        assert(cdm_is_zero(buf, len));
    assert(cdm_is_zero(buf, sizeof buf));
    for (size_t i = 0; i < sizeof buf; i += 997) {
        buf[i] = 1;
        assert(!cdm_is_zero(buf, sizeof buf));
        assert(cdm_is_zero(buf, i));
        assert(!cdm_is_zero(buf, i + 1));
        buf[i] = 0;
    }
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (unsigned char)((seed >> 16) | 1);
    }
}

static void test_copy_and_scan(void)
{
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    int src = open_tmp("src", O_RDWR);
    int dst = open_tmp("dst", O_RDWR);
    const uint64_t size = 16 * MiB + 1000;
    assert(ftruncate(src, (off_t)size) == 0);
    unsigned char *buf = malloc(2 * MiB);
    fill(buf, 2 * MiB, 1);
    assert(pwrite(src, buf, 2 * MiB, 1 * MiB) == (ssize_t)(2 * MiB));
    memset(buf, 0, MiB);
    assert(pwrite(src, buf, MiB, 8 * MiB) == (ssize_t)MiB);            /* zeros as data */
    fill(buf, 1000, 2);
    assert(pwrite(src, buf, 1000, 16 * MiB) == 1000);                   /* odd tail */

    struct cdm_extent ext[16];
    size_t n = 0;
    assert(cdm_scan_extents(ctx, src, 0, 0, size, ext, 16, &n) == 0);
    assert(n >= 4);
    assert(ext[0].flags == CDM_EXTENT_HOLE && ext[0].offset == 0 && ext[0].length == MiB);
    assert(ext[1].flags == CDM_EXTENT_DATA && ext[1].offset == MiB);
    uint64_t covered = 0;
    for (size_t i = 0; i < n; i++) {
        assert(ext[i].offset == covered);
        covered += ext[i].length;
    }
    assert(covered == size);

    assert(ftruncate(dst, (off_t)size) == 0);
    struct cdm_copy_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.size = size;
    opts.src_direct_fd = -1;
    opts.dst_direct_fd = -1;
    opts.map_fd = -1;
    opts.scan_method = CDM_SCAN_SEEK_HOLE;
    opts.request_size = 256 * 1024;
    opts.flags = CDM_COPY_TARGET_IS_ZERO;
    opts.target_sector = 512;
    struct cdm_copy_stats st;
    memset(&st, 0, sizeof st);
    int rc = cdm_copy(ctx, src, dst, &opts, &st);
    if (rc < 0)
        fprintf(stderr, "cdm_copy: %d %s\n", rc, cdm_ctx_errmsg(ctx));
    assert(rc == 0);
    assert(st.bytes_written == 2 * MiB + 1000);
    assert(st.bytes_zero_data == MiB);

    unsigned char *a = malloc(size), *b = malloc(size);
    assert(pread(src, a, size, 0) == (ssize_t)size);
    assert(pread(dst, b, size, 0) == (ssize_t)size);
    assert(memcmp(a, b, size) == 0);

    /* Full-read scan onto a non-zero target: every zero range is zeroed explicitly. */
    fill(b, size, 3);
    assert(pwrite(dst, b, size, 0) == (ssize_t)size);
    opts.scan_method = CDM_SCAN_FULL_READ;
    opts.flags = 0;
    opts.threads = 3;
    memset(&st, 0, sizeof st);
    assert(cdm_copy(ctx, src, dst, &opts, &st) == 0);
    assert(st.bytes_zeroed == size - 2 * MiB - 1000);
    assert(st.zero_methods & (1u << CDM_ZERO_PUNCH_HOLE));
    assert(pread(dst, b, size, 0) == (ssize_t)size);
    assert(memcmp(a, b, size) == 0);

    /* Invalid options are refused with a message. */
    opts.sparse_size = 3000;
    assert(cdm_copy(ctx, src, dst, &opts, &st) == -EINVAL);
    assert(strstr(cdm_ctx_errmsg(ctx), "sparse size") != NULL);

    free(a);
    free(b);
    free(buf);
    close(src);
    close(dst);
    cdm_ctx_free(ctx);
}

static int stop_after_two(void *opaque, uint64_t done, uint64_t total)
{
    int *calls = opaque;
    (void)done;
    (void)total;
    return ++*calls >= 2;
}

static void test_cancel(void)
{
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    int src = open_tmp("csrc", O_RDWR);
    int dst = open_tmp("cdst", O_RDWR);
    unsigned char *buf = malloc(8 * MiB);
    fill(buf, 8 * MiB, 4);
    assert(pwrite(src, buf, 8 * MiB, 0) == (ssize_t)(8 * MiB));
    int calls = 0;
    cdm_ctx_set_progress(ctx, stop_after_two, &calls);
    struct cdm_copy_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.size = 8 * MiB;
    opts.src_direct_fd = opts.dst_direct_fd = opts.map_fd = -1;
    opts.scan_method = CDM_SCAN_FULL_READ;
    opts.request_size = 64 * 1024;
    opts.threads = 1;
    opts.flags = CDM_COPY_TARGET_IS_ZERO;
    struct cdm_copy_stats st;
    memset(&st, 0, sizeof st);
    assert(cdm_copy(ctx, src, dst, &opts, &st) == -CDM_ECANCELED);
    assert(calls >= 2);
    assert(st.bytes_written < 8 * MiB);
    free(buf);
    close(src);
    close(dst);
    cdm_ctx_free(ctx);
}

int main(void)
{
    assert(mkdtemp(dir) != NULL);
    test_is_zero();
    test_copy_and_scan();
    test_cancel();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        return 1;
    printf("test_core: ok\n");
    return 0;
}
