/* fuzz_stream.c -- libFuzzer target for the sequential-stream pipeline (csrc/stream.c): the
 * digest, the detection of the compression and of the format, the gzip/xz/zstd decoders
 * (csrc/decomp.c), the RAW sink and the streaming QCOW2 converter (csrc/qcow2_stream.c).
 *
 * An input is two option bytes followed by the stream.  The options pick the memory limit
 * of a QCOW2 conversion, the digest, the size of the target (a memfd behind a writer) and
 * whether it is known to read as zeros; the second byte seeds the sizes of the pieces the
 * stream is pushed in and, when its top two bits are set, declares the format and the
 * compression (else both are detected: AUTO), and when they are 10 the stream is a container
 * layer whose image is under disk/ (the tar stage, csrc/tar.c).  Invariants:
 *   - a failure is a negative code with a message, from push or end alike;
 *   - on success all bytes were taken (bytes_in), the image fits the target, a QCOW2
 *     conversion held at most the memory limit (peak_held counts every buffer that grows
 *     with the input; the fixed cluster buffers are outside it), the digest is the digest of
 *     the stream, and an uncompressed RAW stream is found on the target byte for byte.
 * A violation aborts (a finding).  Built and run by run_fuzz.sh with ASan, UBSan and
 * libFuzzer; leaks are findings too.
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

#include <openssl/evp.h>

#include "stream.h"

#define OPTION_BYTES 2

static const uint64_t MEM_LIMITS[] = {256u << 10, 300000, 1u << 20, 4u << 20};
static const uint64_t TARGET_SIZES[] = {16u << 20, 1u << 20, 65536 + 512, 4095};

static int dst_fd = -1;
static uint8_t *readback;

static void check(int ok, const char *what, uint64_t a, uint64_t b)
{
    if (!ok) {
        fprintf(stderr, "invariant violated: %s (%llu, %llu)\n", what, (unsigned long long)a,
                (unsigned long long)b);
        abort();
    }
}

static void check_failure(int rc, const struct cdm_error *err, const char *what)
{
    check(rc < 0, what, (uint64_t)(int64_t)rc, 0);
    check(err->msg[0] != '\0', "a failure without a message", (uint64_t)(int64_t)rc, 0);
    check(err->rc == rc, "the message belongs to another failure", (uint64_t)(int64_t)err->rc,
          (uint64_t)(int64_t)rc);
}

/* The next piece size: mostly small and odd, sometimes large, sometimes everything left. */
static size_t next_piece(uint32_t *state, size_t left)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    size_t n;
    switch (x & 3) {
    case 0:
        n = 1 + (x >> 8) % 16;
        break;
    case 1:
        n = 1 + (x >> 8) % 4096;
        break;
    case 2:
        n = 1 + (x >> 8) % (256u << 10);
        break;
    default:
        n = left;
    }
    return n < left ? n : left;
}

/* The digest of BUF by OpenSSL directly, to compare with the pipeline's. */
static void check_digest(int algo, const uint8_t *buf, size_t len,
                         const struct cdm_stream_result *res)
{
    const EVP_MD *md = algo == CDM_HASH_MD5      ? EVP_md5()
                       : algo == CDM_HASH_SHA1   ? EVP_sha1()
                       : algo == CDM_HASH_SHA256 ? EVP_sha256()
                       : algo == CDM_HASH_SHA512 ? EVP_sha512()
                                                 : NULL;
    if (md == NULL) {
        check(res->digest_len == 0, "a digest without a hash", res->digest_len, 0);
        return;
    }
    uint8_t want[EVP_MAX_MD_SIZE];
    unsigned int want_len = 0;
    if (EVP_Digest(buf, len, want, &want_len, md, NULL) != 1)
        abort();
    check(res->digest_len == want_len, "digest length", res->digest_len, want_len);
    check(memcmp(res->digest, want, want_len) == 0, "digest differs", 0, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (dst_fd < 0) {
        dst_fd = memfd_create("stream-dst", MFD_CLOEXEC);
        readback = malloc(TARGET_SIZES[0]);
        if (dst_fd < 0 || readback == NULL)
            abort();
    }
    if (size < OPTION_BYTES)
        return 0;
    uint8_t o0 = data[0];
    uint32_t state = 0x9e3779b9u ^ ((uint32_t)data[1] << 8 | data[1]);
    const uint8_t *in = data + OPTION_BYTES;
    size_t len = size - OPTION_BYTES;

    struct cdm_stream_opts opts = {
        .format = data[1] >> 6 == 3 ? CDM_FORMAT_RAW + ((data[1] >> 2) & 1) : CDM_FORMAT_AUTO,
        .compression = data[1] >> 6 == 3 ? CDM_COMPRESSION_NONE + (data[1] & 3)
                                         : CDM_COMPRESSION_AUTO,
        .hash = (o0 >> 2) % (CDM_HASH_SHA512 + 1),
        .mem_limit = MEM_LIMITS[o0 & 3],
        /* top bits 10: a container layer, the image under disk/ (csrc/tar.c) */
        .tar_dir = data[1] >> 6 == 2 ? "disk" : NULL,
    };
    bool tar = opts.tar_dir != NULL;
    uint64_t target = TARGET_SIZES[(o0 >> 5) & 3];
    bool zero = (o0 >> 7) & 1;

    /* A fresh target of TARGET bytes reading as zeros. */
    if (ftruncate(dst_fd, 0) < 0 || ftruncate(dst_fd, (off_t)target) < 0)
        abort();
    cdm_ctx *ctx;
    if (cdm_ctx_new(&ctx) < 0)
        abort();
    struct cdm_writer_opts wo = {
        .size = target,
        .flags = CDM_COPY_NO_SYNC | (zero ? CDM_COPY_TARGET_IS_ZERO : 0),
    };
    cdm_writer *w;
    if (cdm_writer_open(ctx, dst_fd, -1, &wo, &w) < 0)
        abort();

    struct cdm_error err = {0};
    struct cdm_pipeline *p;
    int rc = cdm_pipeline_new(w, &opts, &err, &p);
    if (rc < 0)
        abort();    /* valid options: only out of memory could fail */
    size_t pos = 0;
    while (rc == 0 && pos < len) {
        size_t n = next_piece(&state, len - pos);
        rc = cdm_pipeline_push(p, in + pos, n);
        if (rc == 0)
            pos += n;
    }
    check(cdm_pipeline_bytes_in(p) == pos, "bytes_in while pushing", cdm_pipeline_bytes_in(p),
          pos);
    struct cdm_stream_result res;
    memset(&res, 0xa5, sizeof res);
    if (rc < 0) {
        check_failure(rc, &err, "push failed with a non-negative code");
        /* The failure sticks. */
        check(cdm_pipeline_end(p, &res) == rc, "end after a failed push", 0, 0);
    } else {
        rc = cdm_pipeline_end(p, &res);
        if (rc != 0)
            check_failure(rc, &err, "end failed with a positive code");
    }
    cdm_pipeline_free(p);

    if (rc == 0) {
        check(res.bytes_in == len, "bytes_in", res.bytes_in, len);
        check(res.image_size <= target, "image larger than the target", res.image_size, target);
        if (tar && !res.tar_found)
            check(res.format == 0 && res.image_size == 0, "a layer without an image",
                  (uint64_t)res.format, res.image_size);
        else
            check(res.format == CDM_FORMAT_RAW || res.format == CDM_FORMAT_QCOW2, "format",
                  (uint64_t)res.format, 0);
        check(memchr(res.tar_member, 0, sizeof res.tar_member) != NULL &&
              memchr(res.tar_names, 0, sizeof res.tar_names) != NULL, "unterminated names", 0, 0);
        check(res.compression >= CDM_COMPRESSION_NONE && res.compression <= CDM_COMPRESSION_ZSTD,
              "compression", (uint64_t)res.compression, 0);
        check(opts.format == CDM_FORMAT_AUTO || res.format == opts.format, "format declared",
              (uint64_t)res.format, (uint64_t)opts.format);
        check(opts.compression == CDM_COMPRESSION_AUTO || res.compression == opts.compression,
              "compression declared", (uint64_t)res.compression, (uint64_t)opts.compression);
        if (res.format == CDM_FORMAT_QCOW2)
            check(res.peak_held <= opts.mem_limit, "peak_held over the memory limit",
                  res.peak_held, opts.mem_limit);
        if (res.format == CDM_FORMAT_RAW && !tar)
            check(res.image_size == res.bytes_out, "RAW image size", res.image_size,
                  res.bytes_out);
        check_digest(opts.hash, in, len, &res);
        rc = cdm_writer_finish(w, NULL);
        check(rc == 0, "finishing the writer", (uint64_t)(int64_t)rc, 0);
        if (res.format == CDM_FORMAT_RAW && res.compression == CDM_COMPRESSION_NONE && !tar) {
            check(res.image_size == len, "RAW size", res.image_size, len);
            if (len > 0 && pread(dst_fd, readback, len, 0) != (ssize_t)len)
                abort();
            check(len == 0 || memcmp(readback, in, len) == 0, "the target differs", 0, 0);
        }
    } else {
        cdm_writer_abort(w);
    }
    cdm_writer_free(w);
    cdm_ctx_free(ctx);
    return 0;
}
