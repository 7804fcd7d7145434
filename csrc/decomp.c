/* decomp.c -- push-style decompressors for sequential streams: gzip (zlib, concatenated
 * members as `gzip -d` reads them), xz (liblzma, concatenated streams, bounded decoder
 * memory) and zstd (any number of frames).  Each is a struct cdm_sink that decodes what it
 * is pushed into one output buffer, allocated once, and pushes every filled piece on to the
 * next sink.  The output is bounded (a decompression bomb stops at the target's size);
 * corrupt input is reported with its offset, truncated input when the stream ends.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <lzma.h>
#include <zlib.h>
#ifdef CDM_HAVE_ZSTD
#include <zstd.h>
#endif

#include "stream.h"

#define OUT_BYTES (1u << 20)                /* output buffer of a decompressor */
#define XZ_MEMLIMIT (256ull << 20)          /* decoder memory an xz stream may ask for */
#define ULL(v) ((unsigned long long)(v))

static const uint8_t GZIP_MAGIC[] = {0x1f, 0x8b};
static const uint8_t XZ_MAGIC[] = {0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00};
static const uint8_t ZSTD_MAGIC[] = {0x28, 0xb5, 0x2f, 0xfd};

struct magic {
    int compression;
    const uint8_t *bytes;
    size_t len;
};

static const struct magic MAGICS[] = {
    {CDM_COMPRESSION_GZIP, GZIP_MAGIC, sizeof GZIP_MAGIC},
    {CDM_COMPRESSION_XZ, XZ_MAGIC, sizeof XZ_MAGIC},
    {CDM_COMPRESSION_ZSTD, ZSTD_MAGIC, sizeof ZSTD_MAGIC},
};

/* The compression whose magic BUF (LEN bytes, the start of a stream) begins with;
 * CDM_COMPRESSION_AUTO while BUF is a strict prefix of a magic and more may come (FINAL
 * false); CDM_COMPRESSION_NONE when nothing matches. */
int cdm_compression_sniff(const uint8_t *buf, size_t len, bool final)
{
    bool maybe = false;
    for (size_t i = 0; i < sizeof MAGICS / sizeof MAGICS[0]; i++) {
        const struct magic *m = &MAGICS[i];
        size_t n = CDM_MIN(len, m->len);
        if (memcmp(buf, m->bytes, n) != 0)
            continue;
        if (n == m->len)
            return m->compression;
        maybe = true;
    }
    return maybe && !final ? CDM_COMPRESSION_AUTO : CDM_COMPRESSION_NONE;
}

/* The name of CDM_COMPRESSION_* C for messages. */
const char *cdm_compression_name(int c)
{
    switch (c) {
    case CDM_COMPRESSION_NONE:
        return "uncompressed";
    case CDM_COMPRESSION_GZIP:
        return "gzip";
    case CDM_COMPRESSION_XZ:
        return "xz";
    case CDM_COMPRESSION_ZSTD:
        return "zstd";
    default:
        return "unknown compression";
    }
}

struct decomp {
    struct cdm_sink sink;
    int compression;
    struct cdm_sink *next;      /* owned */
    struct cdm_error *err;
    uint8_t *out;               /* OUT_BYTES */
    uint64_t limit;             /* output bytes allowed */
    uint64_t bytes_in;          /* input consumed before the current push */
    uint64_t bytes_out;
    uint64_t member_at;         /* gzip: input offset of the current member */
    bool open;                  /* inside a member / stream / frame */
    bool ended;                 /* gzip: a member ended, the next one has not started */
    bool inited;
    union {
        z_stream z;
        lzma_stream x;
#ifdef CDM_HAVE_ZSTD
        ZSTD_DStream *zs;
#endif
    } u;
};

/* Hand the N bytes decoded into D->out to the next sink, within the limit. */
static int emit(struct decomp *d, size_t n)
{
    if (n == 0)
        return 0;
    if (n > d->limit - d->bytes_out)
        return cdm_error_set(d->err, CDM_SIDE_TARGET, -CDM_ETOOSMALL,
                             "the decompressed image is larger than the target (%llu bytes)",
                             ULL(d->limit));
    d->bytes_out += n;
    return d->next->push(d->next, d->out, n);
}

static int corrupt(struct decomp *d, uint64_t at, const char *why)
{
    if (d->member_at > 0)
        return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                             "the %s data is corrupt at input offset %llu (in the member "
                             "starting at %llu): %s",
                             cdm_compression_name(d->compression), ULL(at), ULL(d->member_at),
                             why);
    return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                         "the %s data is corrupt at input offset %llu: %s",
                         cdm_compression_name(d->compression), ULL(at), why);
}

static int truncated(struct decomp *d)
{
    return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT,
                         "the %s stream is truncated: it ends after %llu bytes, inside %s",
                         cdm_compression_name(d->compression), ULL(d->bytes_in),
                         d->compression == CDM_COMPRESSION_GZIP ? "a member"
                         : d->compression == CDM_COMPRESSION_ZSTD ? "a frame" : "a stream");
}

/* ---- gzip ------------------------------------------------------------------------------- */

static int gzip_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct decomp *d = (struct decomp *)s;
    z_stream *z = &d->u.z;
    z->next_in = (Bytef *)buf;
    z->avail_in = (uInt)len;   /* pushes are bounded far below 4 GiB (see decomp_push) */
    int rc = 0;
    while (rc == 0) {
        if (d->ended && z->avail_in > 0) {
            inflateReset(z);   /* the next member of a concatenation */
            d->ended = false;
            d->member_at = d->bytes_in + (len - z->avail_in);
        }
        if (z->avail_in > 0)
            d->open = true;
        z->next_out = d->out;
        z->avail_out = OUT_BYTES;
        int zr = inflate(z, Z_NO_FLUSH);
        uint64_t at = d->bytes_in + (len - z->avail_in);
        if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR)
            return corrupt(d, at, z->msg != NULL ? z->msg : zError(zr));
        rc = emit(d, OUT_BYTES - z->avail_out);
        if (zr == Z_STREAM_END) {
            d->open = false;
            d->ended = true;
            if (z->avail_in == 0)
                break;
            continue;
        }
        if (z->avail_in == 0 && z->avail_out != 0)
            break;
        if (zr == Z_BUF_ERROR && z->avail_out != 0)
            break;
    }
    d->bytes_in += len - z->avail_in;
    return rc;
}

static int gzip_end(struct decomp *d)
{
    return d->open ? truncated(d) : 0;
}

/* ---- xz --------------------------------------------------------------------------------- */

static int xz_error(struct decomp *d, lzma_ret r, uint64_t at)
{
    switch (r) {
    case LZMA_MEM_ERROR:
        return cdm_error_set(d->err, CDM_SIDE_NONE, -ENOMEM, "out of memory decoding xz");
    case LZMA_MEMLIMIT_ERROR:
        return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EUNSUPPORTED,
                             "the xz stream needs %llu bytes of decoder memory, more than the "
                             "limit of %llu bytes (input offset %llu)",
                             ULL(lzma_memusage(&d->u.x)), ULL(XZ_MEMLIMIT), ULL(at));
    case LZMA_OPTIONS_ERROR:
        return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EUNSUPPORTED,
                             "the xz stream uses unsupported options (input offset %llu)",
                             ULL(at));
    case LZMA_FORMAT_ERROR:
        return corrupt(d, at, "not in xz format");
    case LZMA_BUF_ERROR:
        return truncated(d);
    default:
        return corrupt(d, at, r == LZMA_DATA_ERROR ? "compressed data is corrupt"
                              : "the decoder failed");
    }
}

/* Run the xz decoder over the input already set in D with ACTION. */
static int xz_run(struct decomp *d, lzma_action action, size_t len)
{
    lzma_stream *x = &d->u.x;
    int rc = 0;
    while (rc == 0) {
        x->next_out = d->out;
        x->avail_out = OUT_BYTES;
        lzma_ret r = lzma_code(x, action);
        uint64_t at = d->bytes_in + (len - x->avail_in);
        if (r != LZMA_OK && r != LZMA_STREAM_END)
            return xz_error(d, r, at);
        rc = emit(d, OUT_BYTES - x->avail_out);
        if (r == LZMA_STREAM_END) {
            d->open = false;
            break;
        }
        if (x->avail_in == 0 && x->avail_out != 0 && action == LZMA_RUN)
            break;
    }
    return rc;
}

static int xz_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct decomp *d = (struct decomp *)s;
    d->u.x.next_in = buf;
    d->u.x.avail_in = len;
    d->open = true;
    int rc = xz_run(d, LZMA_RUN, len);
    d->bytes_in += len - d->u.x.avail_in;
    return rc;
}

static int xz_end(struct decomp *d)
{
    d->u.x.next_in = NULL;
    d->u.x.avail_in = 0;
    return xz_run(d, LZMA_FINISH, 0);
}

/* ---- zstd ------------------------------------------------------------------------------- */

#ifdef CDM_HAVE_ZSTD
static int zstd_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct decomp *d = (struct decomp *)s;
    ZSTD_inBuffer in = {buf, len, 0};
    int rc = 0;
    while (rc == 0) {
        ZSTD_outBuffer o = {d->out, OUT_BYTES, 0};
        size_t r = ZSTD_decompressStream(d->u.zs, &o, &in);
        if (ZSTD_isError(r))
            return corrupt(d, d->bytes_in + in.pos, ZSTD_getErrorName(r));
        d->open = r != 0;
        rc = emit(d, o.pos);
        if (in.pos == in.size && o.pos < o.size)
            break;
    }
    d->bytes_in += in.pos;
    return rc;
}
#endif

static int zstd_end(struct decomp *d)
{
    return d->open ? truncated(d) : 0;
}

/* ---- the stage -------------------------------------------------------------------------- */

static int decomp_push(struct cdm_sink *s, const uint8_t *buf, size_t len)
{
    struct decomp *d = (struct decomp *)s;
    int rc = 0;
    /* zlib counts in uInt: feed at most 1 GiB at a time (all decoders alike). */
    while (rc == 0 && len > 0) {
        size_t n = CDM_MIN(len, (size_t)1 << 30);
        switch (d->compression) {
        case CDM_COMPRESSION_GZIP:
            rc = gzip_push(s, buf, n);
            break;
        case CDM_COMPRESSION_XZ:
            rc = xz_push(s, buf, n);
            break;
#ifdef CDM_HAVE_ZSTD
        case CDM_COMPRESSION_ZSTD:
            rc = zstd_push(s, buf, n);
            break;
#endif
        default:
            rc = -EINVAL;
        }
        buf += n;
        len -= n;
    }
    return rc;
}

static int decomp_end(struct cdm_sink *s, struct cdm_stream_result *res)
{
    struct decomp *d = (struct decomp *)s;
    int rc;
    if (d->bytes_in == 0)
        rc = cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EFORMAT, "the %s stream is empty",
                           cdm_compression_name(d->compression));
    else if (d->compression == CDM_COMPRESSION_GZIP)
        rc = gzip_end(d);
    else if (d->compression == CDM_COMPRESSION_XZ)
        rc = xz_end(d);
    else
        rc = zstd_end(d);
    if (rc == 0)
        rc = d->next->end(d->next, res);
    if (res != NULL) {
        res->compression = d->compression;
        res->bytes_out = d->bytes_out;
    }
    return rc;
}

static void decomp_destroy(struct cdm_sink *s)
{
    struct decomp *d = (struct decomp *)s;
    if (d->inited) {
        if (d->compression == CDM_COMPRESSION_GZIP)
            inflateEnd(&d->u.z);
        else if (d->compression == CDM_COMPRESSION_XZ)
            lzma_end(&d->u.x);
#ifdef CDM_HAVE_ZSTD
        else if (d->compression == CDM_COMPRESSION_ZSTD)
            ZSTD_freeDStream(d->u.zs);
#endif
    }
    if (d->next != NULL)
        d->next->destroy(d->next);
    free(d->out);
    free(d);
}

static int decoder_init(struct decomp *d)
{
    switch (d->compression) {
    case CDM_COMPRESSION_GZIP:
        /* 16 + MAX_WBITS: gzip members only (no zlib or raw deflate). */
        if (inflateInit2(&d->u.z, 16 + MAX_WBITS) != Z_OK)
            return cdm_error_set(d->err, CDM_SIDE_NONE, -ENOMEM, "cannot set up zlib");
        break;
    case CDM_COMPRESSION_XZ: {
        lzma_stream init = LZMA_STREAM_INIT;
        d->u.x = init;
        lzma_ret r = lzma_stream_decoder(&d->u.x, XZ_MEMLIMIT, LZMA_CONCATENATED);
        if (r != LZMA_OK)
            return cdm_error_set(d->err, CDM_SIDE_NONE, r == LZMA_MEM_ERROR ? -ENOMEM : -EINVAL,
                                 "cannot set up the xz decoder (liblzma error %d)", (int)r);
        break;
    }
    case CDM_COMPRESSION_ZSTD:
#ifdef CDM_HAVE_ZSTD
        d->u.zs = ZSTD_createDStream();
        if (d->u.zs == NULL)
            return cdm_error_set(d->err, CDM_SIDE_NONE, -ENOMEM, "cannot set up zstd");
        ZSTD_initDStream(d->u.zs);
        break;
#else
        return cdm_error_set(d->err, CDM_SIDE_SOURCE, -CDM_EUNSUPPORTED,
                             "the stream is zstd-compressed and this build has no zstd");
#endif
    default:
        return cdm_error_set(d->err, CDM_SIDE_NONE, -EINVAL, "unknown compression %d",
                             d->compression);
    }
    d->inited = true;
    return 0;
}

/* A stage decoding COMPRESSION (CDM_COMPRESSION_GZIP, _XZ or _ZSTD) into NEXT, refusing to
 * produce more than LIMIT bytes (-CDM_ETOOSMALL).  The stage owns NEXT from this call on,
 * also when it fails.  Messages go to ERR.  0 (*OUT set), -ENOMEM, -EINVAL or
 * -CDM_EUNSUPPORTED (a decoder this build lacks). */
int cdm_decomp_new(int compression, uint64_t limit, struct cdm_sink *next,
                   struct cdm_error *err, struct cdm_sink **out)
{
    *out = NULL;
    struct decomp *d = calloc(1, sizeof *d);
    if (d == NULL) {
        next->destroy(next);
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    }
    d->sink = (struct cdm_sink){.push = decomp_push, .end = decomp_end,
                               .destroy = decomp_destroy};
    d->compression = compression;
    d->next = next;
    d->err = err;
    d->limit = limit;
    d->out = malloc(OUT_BYTES);
    int rc = d->out == NULL ? cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory")
                            : decoder_init(d);
    if (rc < 0) {
        decomp_destroy(&d->sink);
        return rc;
    }
    *out = &d->sink;
    return 0;
}
