/* fuzz_qcow2.c -- libFuzzer target for the QCOW2 reader (csrc/qcow2.c) and the conversion
 * job (csrc/convert.c).
 *
 * Each input is an image file, served by the file reader of a memfd.  It is opened and validated (header, extensions, tables),
 * then the whole guest disk is mapped through the L1/L2 tables run by run and every
 * compressed cluster is decompressed; the invariants the converter relies on are checked and
 * a violation aborts (a finding).  Small images are also converted for real into a memfd.
 * Built and run by run_fuzz.sh with ASan, UBSan and libFuzzer.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "qcow2.h"

#define MAP_LIMIT (1ull << 40)      /* guest bytes mapped per input */
#define MAP_STEPS 200000u           /* runs mapped per input */
#define CONVERT_LIMIT (8ull << 20)  /* virtual sizes converted end to end */

static int src_fd = -1;
static int dst_fd = -1;

static void check(int ok, const char *what, uint64_t a, uint64_t b)
{
    if (!ok) {
        fprintf(stderr, "invariant violated: %s (0x%llx, 0x%llx)\n", what,
                (unsigned long long)a, (unsigned long long)b);
        abort();
    }
}

/* Map [0, min(virtual size, MAP_LIMIT)) and decompress every compressed cluster. */
static void walk(struct qcow2_image *img)
{
    struct qcow2_cache cache;
    struct qcow2_decoders pool;
    struct cdm_error err = {0};
    if (qcow2_cache_init(&cache, img) < 0)
        return;
    qcow2_decoders_init(&pool);
    uint8_t *in = malloc(2 * img->cluster_size);
    uint8_t *out = malloc(img->cluster_size);
    uint64_t limit = img->virtual_size < MAP_LIMIT ? img->virtual_size : MAP_LIMIT;
    uint64_t pos = 0;
    for (unsigned steps = 0; in != NULL && out != NULL && pos < limit && steps < MAP_STEPS;
         steps++) {
        struct qcow2_run run;
        cdm_error_clear(&err);
        if (qcow2_map(&cache, pos, limit - pos, &run, &err) < 0) {
            check(err.msg[0] != '\0', "error without a message", pos, 0);
            break;
        }
        check(run.guest_off == pos, "run starts elsewhere", run.guest_off, pos);
        check(run.length > 0 && run.length <= limit - pos, "run length", run.length, limit - pos);
        if (run.kind == QCOW2_DATA) {
            check(run.host_off >= img->cluster_size, "data in the header", run.host_off, 0);
            check(run.host_off + run.length <= img->file_size, "data past EOF", run.host_off,
                  run.length);
        } else if (run.kind == QCOW2_COMPRESSED) {
            check(run.length <= img->cluster_size, "compressed run too long", run.length, 0);
            check(run.csize > 0 && run.csize <= 2 * img->cluster_size, "csize", run.csize, 0);
            check(run.host_off + run.csize <= img->file_size, "compressed past EOF",
                  run.host_off, run.csize);
            struct cdm_io io;
            memset(&io, 0, sizeof io);
            if (cdm_read(img->src, in, run.csize, run.host_off, CDM_READ_CACHED, &io) == 0) {
                struct qcow2_decoder *d = qcow2_decoder_get(&pool);
                check(d != NULL, "no decoder", 0, 0);
                cdm_error_clear(&err);
                int rc = qcow2_decompress(img, d, in, run.csize, out, img->cluster_size,
                                          run.cluster_guest, NULL, &err);
                qcow2_decoder_put(&pool, d);
                check(rc == 0 || err.msg[0] != '\0', "decompress error without a message", 0,
                      0);
            }
        }
        pos += run.length;
    }
    free(in);
    free(out);
    qcow2_decoders_fini(&pool);
    qcow2_cache_fini(&cache);
}

/* Convert end to end into a memfd, as the library would. */
static void convert(const struct qcow2_image *img)
{
    cdm_ctx *ctx;
    if (cdm_ctx_new(&ctx) < 0)
        return;
    if (ftruncate(dst_fd, 0) == 0 && ftruncate(dst_fd, (off_t)img->virtual_size) == 0) {
        struct cdm_copy_opts opts;
        struct cdm_copy_stats stats;
        memset(&opts, 0, sizeof opts);
        memset(&stats, 0, sizeof stats);
        opts.size = img->virtual_size;
        opts.src_direct_fd = opts.dst_direct_fd = opts.map_fd = -1;
        opts.threads = 2;
        opts.flags = CDM_COPY_TARGET_IS_ZERO | CDM_COPY_NO_SYNC;
        int rc = cdm_qcow2_convert(ctx, src_fd, dst_fd, &opts, &stats);
        check(rc == 0 || cdm_ctx_errmsg(ctx)[0] != '\0', "convert error without a message", 0,
              0);
    }
    cdm_ctx_free(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (src_fd < 0) {
        src_fd = memfd_create("qcow2-src", MFD_CLOEXEC);
        dst_fd = memfd_create("qcow2-dst", MFD_CLOEXEC);
        if (src_fd < 0 || dst_fd < 0)
            abort();
    }
    if (ftruncate(src_fd, 0) < 0 || (size > 0 && pwrite(src_fd, data, size, 0) != (ssize_t)size))
        return 0;

    /* The image is read only through a reader, as any source would serve it. */
    struct cdm_file_reader fr;
    struct cdm_error err = {0};
    if (cdm_file_reader_init(&fr, src_fd, -1, src_fd, 0, &err) < 0)
        abort();
    struct qcow2_image *img = malloc(sizeof *img);
    if (img == NULL)
        return 0;
    int rc = qcow2_open(img, &fr.r, &err);
    check(rc == 0 || err.msg[0] != '\0', "open error without a message", 0, 0);
    if (rc == 0) {
        walk(img);
        if (img->virtual_size <= CONVERT_LIMIT)
            convert(img);
    }
    free(img);
    return 0;
}
