/* stream.h -- internals of sequential streams: push stages (decompressors, a hasher, the RAW
 * writer sink, the streaming QCOW2 converter) chained into a pipeline that any byte source
 * (a file descriptor, an HTTP body) pushes into.  Nothing here is part of the public API.
 */
#ifndef CDIMOVER_STREAM_H
#define CDIMOVER_STREAM_H

#include "internal.h"

/* One stage: takes the bytes that follow the previous ones, in order. */
struct cdm_sink {
    /* 0, or -errno / -CDM_E* with the message in the sink's error (see the constructors). */
    int (*push)(struct cdm_sink *s, const uint8_t *buf, size_t len);
    /* The input ended: check it is complete, flush, and fill what the stage knows into RES
     * (may be NULL).  0 or an error as push. */
    int (*end)(struct cdm_sink *s, struct cdm_stream_result *res);
    void (*destroy)(struct cdm_sink *s);
};

/* The streaming QCOW2 converter (qcow2_stream.c): a QCOW2 image arriving in file order is
 * converted onto W holding at most MEM_LIMIT bytes of data that arrived before the L2 entry
 * that places it.  Errors go to ERR (which must outlive the sink). */
int cdm_qcow2_stream_new(cdm_writer *w, uint64_t mem_limit, struct cdm_error *err,
                         struct cdm_sink **out);

/* Decompressors (decomp.c).  A stage decoding COMPRESSION (CDM_COMPRESSION_GZIP, _XZ, _ZSTD)
 * into NEXT, which it owns from the call on (also when the call fails), producing at most
 * LIMIT bytes (-CDM_ETOOSMALL past it).  Errors go to ERR. */
int cdm_decomp_new(int compression, uint64_t limit, struct cdm_sink *next,
                   struct cdm_error *err, struct cdm_sink **out);
/* The compression a stream starting with BUF (LEN bytes) has by its magic bytes;
 * CDM_COMPRESSION_AUTO when more bytes are needed to tell (never when FINAL). */
int cdm_compression_sniff(const uint8_t *buf, size_t len, bool final);
const char *cdm_compression_name(int compression);

/* The RAW sink (stream.c): bytes written from offset 0 of W onwards; past W's size is
 * -CDM_ETOOSMALL.  Errors go to ERR. */
int cdm_raw_sink_new(cdm_writer *w, struct cdm_error *err, struct cdm_sink **out);

/* The detection stage alone (stream.c): compression by magic bytes, then the format, then
 * the RAW sink or the QCOW2 converter onto W, as the tail of cdm_pipeline_new builds it
 * (OPTS->tar_dir is ignored).  Errors go to ERR. */
int cdm_detect_new(cdm_writer *w, const struct cdm_stream_opts *opts, struct cdm_error *err,
                   struct cdm_sink **out);

/* The tar stage (tar.c): the bytes pushed are a tar archive (ustar, GNU or pax); the single
 * regular file directly under OPTS->tar_dir goes through a fresh cdm_detect_new pipeline onto
 * W (a sparse member's holes as zeros), other members are skipped.  Its end fills the tar_*
 * fields of the result (and the image's).  LIMIT bounds the archive's bytes.  Errors go to
 * ERR. */
int cdm_tar_new(cdm_writer *w, const struct cdm_stream_opts *opts, uint64_t limit,
                struct cdm_error *err, struct cdm_sink **out);

/* Hashes (hash.c, OpenSSL's EVP). */
struct cdm_hasher {
    void *md_ctx;           /* EVP_MD_CTX *, or NULL for CDM_HASH_NONE */
    int algo;
};
int cdm_hasher_init(struct cdm_hasher *h, int algo, struct cdm_error *err);
int cdm_hasher_update(struct cdm_hasher *h, const void *buf, size_t len, struct cdm_error *err);
/* Final digest into OUT (64 bytes of room); *LEN receives its length (0 for none). */
int cdm_hasher_final(struct cdm_hasher *h, uint8_t *out, uint32_t *len, struct cdm_error *err);
void cdm_hasher_fini(struct cdm_hasher *h);

/* A whole pipeline for OPTS onto W: hash (over the input) -> detection -> decompression ->
 * RAW sink or QCOW2 converter.  Messages go to ERR (owned by the caller). */
struct cdm_pipeline;
int cdm_pipeline_new(cdm_writer *w, const struct cdm_stream_opts *opts, struct cdm_error *err,
                     struct cdm_pipeline **out);
int cdm_pipeline_push(struct cdm_pipeline *p, const uint8_t *buf, size_t len);
/* The input ended: finish every stage and fill RES.  0 or error. */
int cdm_pipeline_end(struct cdm_pipeline *p, struct cdm_stream_result *res);
/* Bytes pushed so far (the offset of the input a resumed transfer continues from). */
uint64_t cdm_pipeline_bytes_in(const struct cdm_pipeline *p);
void cdm_pipeline_free(struct cdm_pipeline *p);

#endif /* CDIMOVER_STREAM_H */
