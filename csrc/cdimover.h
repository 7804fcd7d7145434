/* cdimover.h -- the one public header of cdimover's native core.
 *
 * The core moves disk images between regular files and block devices: it discovers
 * extents on the source (SEEK_DATA/SEEK_HOLE, a loop device's backing file, or a full
 * read), detects zeros inside data, and writes a sparse, durable, bit-exact target.
 *
 * Conventions: every function returns >= 0 on success, -errno on an operating-system
 * failure, or -CDM_E* on a library failure; the detail is in cdm_ctx_errmsg().  The core
 * never opens or closes file descriptors: the caller owns them.  There is no global state;
 * a context runs one operation at a time (cdm_ctx_cancel may be called from any thread).
 *
 * The block between the cffi markers is handed verbatim to cffi's cdef(): keep it free of
 * preprocessor conditionals and includes.
 */
#ifndef CDIMOVER_H
#define CDIMOVER_H

#include <stddef.h>
#include <stdint.h>

/* cffi:begin */
#define CDM_ABI_VERSION 5

enum {
    CDM_EFORMAT = 1000,       /* malformed image */
    CDM_EUNSUPPORTED = 1001,  /* well-formed image using an unsupported feature */
    CDM_EUNSAFE = 1002,       /* image refers to other files */
    CDM_ETOOSMALL = 1003,     /* target cannot hold the source */
    CDM_ECANCELED = 1004,     /* stopped by the progress callback or cdm_ctx_cancel */
    CDM_EHTTP = 1005,         /* the server answered with an error status (cdm_source_info) */
    CDM_ETLS = 1006,          /* TLS failed: untrusted certificate, bad CA bundle, handshake */
    CDM_ENETWORK = 1007,      /* connection failed, dropped or idle, after the retries */
    CDM_EPROTOCOL = 1008,     /* the server broke the protocol (length, ranges, headers) */
    CDM_ECHANGED = 1009,      /* the remote file changed during the transfer */
    CDM_EDIGEST = 1010        /* the bytes received do not have the expected digest */
};

/* Which endpoint an error concerns (cdm_ctx_errside). */
enum { CDM_SIDE_NONE = 0, CDM_SIDE_SOURCE = 1, CDM_SIDE_TARGET = 2 };

enum cdm_zero_method {
    CDM_ZERO_NONE = 0,
    CDM_ZERO_PUNCH_HOLE = 1,
    CDM_ZERO_ZERO_RANGE = 2,
    CDM_ZERO_BLKZEROOUT = 3,
    CDM_ZERO_WRITE = 4
};

/* How space was reserved by preallocation (bits in cdm_copy_stats.alloc_methods). */
enum cdm_alloc_method {
    CDM_ALLOC_NONE = 0,
    CDM_ALLOC_FALLOCATE = 1,     /* fallocate mode 0: unwritten extents (files) */
    CDM_ALLOC_WRITE_ZEROES = 2,  /* FALLOC_FL_WRITE_ZEROES: written, zeroed extents (files) */
    CDM_ALLOC_ZERO_RANGE = 3,    /* fallocate ZERO_RANGE: REQ_OP_WRITE_ZEROES, no unmap (devices) */
    CDM_ALLOC_BLKZEROOUT = 4,    /* BLKZEROOUT (devices) */
    CDM_ALLOC_WRITE = 5          /* zeros written */
};

enum cdm_prealloc {
    CDM_PREALLOC_OFF = 0,        /* sparse: holes stay holes */
    CDM_PREALLOC_FALLOC = 1,     /* every block reserved; may read as unwritten zeros */
    CDM_PREALLOC_FULL = 2        /* every block physically written */
};

enum cdm_scan_method {
    CDM_SCAN_NONE = 0,
    CDM_SCAN_SEEK_HOLE = 1,     /* SEEK_DATA/SEEK_HOLE on the source */
    CDM_SCAN_LOOP_BACKING = 2,  /* SEEK_DATA/SEEK_HOLE on a loop device's backing file */
    CDM_SCAN_FULL_READ = 3,     /* every byte read, zeros detected by content */
    CDM_SCAN_REFLINK = 4,       /* extents shared with FICLONE, nothing read */
    CDM_SCAN_QCOW2 = 5          /* QCOW2 L1/L2 tables */
};

enum cdm_copy_flags {
    CDM_COPY_TARGET_IS_ZERO = 1,  /* the target reads as zeros: zero ranges are skipped */
    CDM_COPY_NO_ZERO_DETECT = 2,  /* write data blocks even when they are all zeros */
    CDM_COPY_NO_SYNC = 4          /* skip the final fdatasync (tests and benchmarks only) */
};

enum cdm_extent_flags { CDM_EXTENT_DATA = 0, CDM_EXTENT_HOLE = 1 };

typedef struct cdm_ctx cdm_ctx;

/* Called by the thread that started the operation; non-zero return cancels it. */
typedef int (*cdm_progress_fn)(void *opaque, uint64_t done, uint64_t total);

struct cdm_extent {
    uint64_t offset;
    uint64_t length;
    uint32_t flags;               /* CDM_EXTENT_* */
};

struct cdm_probe {
    uint64_t size;                /* bytes (BLKGETSIZE64 for devices) */
    uint64_t dev;                 /* st_dev */
    uint64_t ino;                 /* st_ino */
    uint64_t rdev;                /* st_rdev of a device */
    uint64_t blocks;              /* st_blocks, 512-byte units (never trusted for scanning) */
    uint32_t logical_sector;      /* BLKSSZGET for devices, 512 for files */
    uint32_t physical_sector;     /* BLKPBSZGET for devices, st_blksize for files */
    uint32_t fs_block;            /* st_blksize */
    int is_blockdev;
    int is_regular;
};

struct cdm_loop_status {
    uint64_t backing_dev;         /* st_dev of the backing file */
    uint64_t backing_ino;         /* st_ino of the backing file */
    uint64_t offset;              /* lo_offset */
    uint64_t sizelimit;           /* lo_sizelimit, 0 = none */
    uint32_t flags;               /* lo_flags */
};

struct cdm_copy_opts {
    uint64_t size;                /* bytes to copy, from offset 0 of source and target */
    int src_direct_fd;            /* O_DIRECT twin of the source fd, or -1 */
    int dst_direct_fd;            /* O_DIRECT twin of the target fd, or -1 */
    int map_fd;                   /* fd whose SEEK_DATA map describes the source, or -1 */
    uint64_t map_offset;          /* source offset 0 is map_fd offset MAP_OFFSET */
    int scan_method;              /* CDM_SCAN_SEEK_HOLE, _LOOP_BACKING or _FULL_READ */
    uint32_t request_size;        /* bytes per request; 0 = default (4 MiB) */
    uint32_t sparse_size;         /* zero-detection granularity; 0 = 4096 */
    uint32_t threads;             /* worker threads; 0 = default */
    uint32_t flags;               /* CDM_COPY_* */
    uint32_t target_sector;       /* target's logical sector size (alignment of zeroing) */
    int target_is_blockdev;
    int preallocation;            /* CDM_PREALLOC_*: zero ranges are allocated, never punched */
};

struct cdm_copy_stats {
    uint64_t bytes_read;          /* bytes read from the source */
    uint64_t bytes_written;       /* data bytes written to the target */
    uint64_t bytes_zeroed;        /* bytes zeroed on the target by a zeroing method */
    uint64_t bytes_skipped;       /* bytes left untouched because the target reads as zeros */
    uint64_t bytes_zero_data;     /* zero bytes found inside source data by content */
    uint64_t zero_calls;          /* zeroing operations issued */
    uint32_t zero_methods;        /* bit (1 << CDM_ZERO_*) for each zeroing method used */
    uint32_t zero_fallbacks;      /* times a zeroing method failed and the next was tried */
    uint32_t alloc_methods;       /* bit (1 << CDM_ALLOC_*) for each preallocation method used */
    uint64_t bytes_allocated;     /* bytes reserved or written by preallocation */
    int scan_method;              /* CDM_SCAN_* actually used */
    int direct_read;              /* 1 when O_DIRECT reads were used */
    int direct_write;             /* 1 when O_DIRECT writes were used */
    uint64_t read_ns;             /* time inside source reads, summed over the workers */
    uint64_t write_ns;            /* time inside target writes and zeroing, summed likewise */
    uint64_t sync_ns;             /* time inside the final fdatasync */
};

/* Context life cycle and error reporting. */
int cdm_ctx_new(cdm_ctx **out);
void cdm_ctx_free(cdm_ctx *ctx);
void cdm_ctx_set_progress(cdm_ctx *ctx, cdm_progress_fn fn, void *opaque);
void cdm_ctx_cancel(cdm_ctx *ctx);
const char *cdm_ctx_errmsg(const cdm_ctx *ctx);
int cdm_ctx_errside(const cdm_ctx *ctx);

/* Endpoint facts. */
int cdm_probe_fd(cdm_ctx *ctx, int fd, struct cdm_probe *out);
int cdm_loop_status(cdm_ctx *ctx, int fd, struct cdm_loop_status *out);

/* Zero detection and zeroing. */
int cdm_is_zero(const void *buf, size_t len);

/* CRC-32C (Castagnoli, as iSCSI and the snappy framing format): CRC continued over LEN bytes
 * of BUF; start with 0.  The SSE4.2 instruction when the CPU has it, else tables. */
uint32_t cdm_crc32c(uint32_t crc, const void *buf, size_t len);

/* A self-signed certificate for a metrics endpoint: a new EC P-256 key, COMMON_NAME (1-64
 * bytes) as subject and issuer, SUBJECT_ALT_NAMES in OpenSSL's syntax ("DNS:localhost,
 * IP:127.0.0.1"; "" for none), valid from 5 minutes ago for DAYS (1-36500) days, CA:FALSE,
 * signed with SHA-256.  The certificate and the key (PKCS #8) as PEM into CERT and KEY, with
 * room for *CERT_LEN and *KEY_LEN bytes, which are set to the lengths written.  0, -EINVAL,
 * -ENOSPC (a buffer too small) or -EIO (OpenSSL failed; its reason in CTX). */
int cdm_self_signed_cert(cdm_ctx *ctx, const char *common_name, const char *subject_alt_names,
                         uint32_t days, char *cert, size_t *cert_len, char *key, size_t *key_len);
int cdm_zero_range(cdm_ctx *ctx, int fd, int is_blockdev, uint32_t sector,
                   uint64_t offset, uint64_t length, struct cdm_copy_stats *stats);

/* Preallocation of [OFFSET, OFFSET+LENGTH) of FD (DIRECT_FD: its O_DIRECT twin or -1). */
int cdm_preallocate(cdm_ctx *ctx, int fd, int direct_fd, int is_blockdev, uint32_t sector,
                    uint64_t offset, uint64_t length, int mode, struct cdm_copy_stats *stats);

/* Extent discovery. */
int cdm_scan_extents(cdm_ctx *ctx, int fd, uint64_t map_offset, uint64_t offset,
                     uint64_t length, struct cdm_extent *out, size_t cap, size_t *n_out);

/* Copies. */
int cdm_copy(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
             struct cdm_copy_stats *stats);
int cdm_reflink(cdm_ctx *ctx, int src_fd, int dst_fd);

/* The writer: bytes pushed at any offset, in any order, onto a target file or block device,
 * with the zero detection, zeroing cascade, O_DIRECT and preallocation of the copies. */
typedef struct cdm_writer cdm_writer;

struct cdm_writer_opts {
    uint64_t size;                /* bytes of the target that may be written: [0, SIZE) */
    uint32_t sector;              /* the target's logical sector size; 0 = 512 */
    uint32_t sparse_size;         /* zero-detection granularity; 0 = 4096 */
    uint32_t flags;               /* CDM_COPY_TARGET_IS_ZERO, _NO_ZERO_DETECT, _NO_SYNC */
    int is_blockdev;
    int preallocation;            /* CDM_PREALLOC_* */
};

/* Open a writer on FD (DIRECT_FD: its O_DIRECT twin or -1) for OPTS->size bytes, applying
 * the preallocation now; *OUT receives the handle, which keeps CTX for its messages.  With
 * CDM_COPY_TARGET_IS_ZERO zeroing is skipped, so each range must be written at most once.
 * 0, -errno or -EINVAL (bad options); message in CTX. */
int cdm_writer_open(cdm_ctx *ctx, int fd, int direct_fd, const struct cdm_writer_opts *opts,
                    cdm_writer **out);
/* Write LEN bytes of BUF at OFFSET (any alignment); all-zero blocks become zeroed ranges.
 * 0, -errno, or -EINVAL when [OFFSET, OFFSET+LEN) passes the size.  After a failure every
 * further call returns the same failure. */
int cdm_writer_put(cdm_writer *w, const void *buf, size_t len, uint64_t offset);
/* Make [OFFSET, OFFSET+LENGTH) read as zeros (a hole where the policy allows).  As put. */
int cdm_writer_zero(cdm_writer *w, uint64_t offset, uint64_t length);
/* Complete the writer: fdatasync (unless CDM_COPY_NO_SYNC) and add its counters to STATS.
 * 0 or -errno (also the first earlier failure). */
int cdm_writer_finish(cdm_writer *w, struct cdm_copy_stats *stats);
/* Give up: make what was written durable so a re-run finds it, never report completion.
 * 0 or -errno of the sync. */
int cdm_writer_abort(cdm_writer *w);
/* Release W (NULL is allowed); never syncs. */
void cdm_writer_free(cdm_writer *w);

/* QCOW2 */
enum cdm_qcow2_compression {
    CDM_QCOW2_COMPRESSION_ZLIB = 0,   /* raw deflate */
    CDM_QCOW2_COMPRESSION_ZSTD = 1
};

enum cdm_qcow2_crypt {
    CDM_QCOW2_CRYPT_NONE = 0,
    CDM_QCOW2_CRYPT_AES = 1,
    CDM_QCOW2_CRYPT_LUKS = 2
};

/* What cdm_qcow2_inspect found in a validated QCOW2 header.  Names are for reporting only:
 * the core never opens a backing or data file. */
struct cdm_qcow2_info {
    uint64_t virtual_size;            /* bytes */
    uint64_t file_size;               /* bytes of the image file or device */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint64_t snapshots_offset;
    uint32_t version;                 /* 2 or 3 */
    uint32_t cluster_bits;            /* 9..21 */
    uint32_t header_length;
    uint32_t l1_size;                 /* entries */
    uint32_t refcount_table_clusters;
    uint32_t refcount_order;          /* refcount bits = 1 << refcount_order */
    uint32_t nb_snapshots;
    uint32_t crypt_method;            /* CDM_QCOW2_CRYPT_* (other values reported as read) */
    uint32_t compression_type;        /* CDM_QCOW2_COMPRESSION_* */
    int compression_supported;        /* this build can decompress compression_type */
    int has_backing;
    int has_data_file;                /* incompatible bit or data-file name extension */
    int data_file_raw;                /* autoclear "raw external data" bit */
    int has_bitmaps;                  /* bitmaps extension present */
    int extended_l2;
    int lazy_refcounts;
    int dirty;
    int corrupt;
    char backing_name[1024];          /* NUL-terminated */
    char backing_format[64];
    char data_file_name[1024];        /* truncated to 1023 bytes */
};

/* Validate the QCOW2 header of FD and describe it in OUT (backing files, data files and
 * encryption are reported, not refused).  0, -errno, -CDM_EFORMAT or -CDM_EUNSUPPORTED. */
int cdm_qcow2_inspect(cdm_ctx *ctx, int fd, struct cdm_qcow2_info *out);
/* Convert the QCOW2 image SRC_FD to RAW on DST_FD; OPTS->size is the virtual size from
 * cdm_qcow2_inspect.  0, -errno, -CDM_EFORMAT, -CDM_EUNSUPPORTED, -CDM_EUNSAFE or
 * -CDM_ECANCELED. */
int cdm_qcow2_convert(cdm_ctx *ctx, int src_fd, int dst_fd, const struct cdm_copy_opts *opts,
                      struct cdm_copy_stats *stats);
/* ---- Sequential streams (stream.c): a byte stream, maybe compressed, holding a RAW or
 * QCOW2 image, decoded on the fly onto a writer in one pass (ABI 3). */
enum cdm_format { CDM_FORMAT_AUTO = 0, CDM_FORMAT_RAW = 1, CDM_FORMAT_QCOW2 = 2 };
enum cdm_compression {
    CDM_COMPRESSION_AUTO = 0,     /* detected by magic bytes */
    CDM_COMPRESSION_NONE = 1,
    CDM_COMPRESSION_GZIP = 2,
    CDM_COMPRESSION_XZ = 3,
    CDM_COMPRESSION_ZSTD = 4
};
enum cdm_hash {
    CDM_HASH_NONE = 0, CDM_HASH_MD5 = 1, CDM_HASH_SHA1 = 2, CDM_HASH_SHA256 = 3,
    CDM_HASH_SHA512 = 4
};

struct cdm_stream_opts {
    int format;                   /* CDM_FORMAT_*: what the decompressed stream holds */
    int compression;              /* CDM_COMPRESSION_* */
    int hash;                     /* CDM_HASH_*: over the bytes as received (before decoding) */
    uint64_t mem_limit;           /* bytes a sequential QCOW2 conversion may hold; 0 = 64 MiB */
    /* A container layer (tar.c): non-NULL makes the decompressed stream a tar archive whose
     * single regular file directly under this directory (e.g. "disk") is the image, decoded
     * by a detection of its own (compressed or not, RAW or QCOW2) onto the writer.  FORMAT
     * then applies to that file; COMPRESSION to the archive. */
    const char *tar_dir;
    /* With TAR_DIR: names under it, one a line, that upper layers' whiteouts hide (skipped). */
    const char *tar_skip;
    /* With HASH: the digest the bytes must have (as long as HASH's digest), NULL: none.  A
     * mismatch ends the stream in -CDM_EDIGEST, also after a decoding failure: once the bytes
     * stop decoding (-CDM_EFORMAT), the rest of the stream (at most EXPECT_SIZE bytes in all
     * when nonzero) goes through the digest alone, so that a corrupted download is reported
     * as the cause and the decoding failure as its consequence (ABI 4). */
    const uint8_t *expect_digest;
    uint64_t expect_size;
};

struct cdm_stream_result {
    uint64_t bytes_in;            /* bytes received (compressed) */
    uint64_t bytes_out;           /* bytes after decompression */
    uint64_t image_size;          /* guest bytes: RAW = bytes_out, QCOW2 = virtual size */
    uint64_t peak_held;           /* most bytes held at once by a QCOW2 conversion */
    int format;                   /* CDM_FORMAT_* found */
    int compression;              /* CDM_COMPRESSION_* found */
    uint32_t digest_len;          /* bytes of DIGEST (0: no hash) */
    uint8_t digest[64];
    /* With TAR_DIR (else zeros).  COMPRESSION and BYTES_OUT then describe the archive;
     * FORMAT, IMAGE_SIZE and PEAK_HELD the image found in it. */
    int tar_found;                /* 1: the image came from the member TAR_MEMBER */
    int tar_hidden;               /* 1: the layer hides lower layers' TAR_DIR (a whiteout of it
                                   * or of a parent, an opaque whiteout in it or a parent, or a
                                   * non-directory in its place) */
    int tar_compression;          /* CDM_COMPRESSION_* of the member's bytes */
    uint32_t tar_entries;         /* entries (files, directories, links...) in the archive */
    uint64_t tar_member_size;     /* bytes of the member (a sparse member: its full size) */
    char tar_member[256];         /* the member's path in the archive, normalised */
    /* Every other entry seen under TAR_DIR (directories end in '/', whiteouts keep their
     * ".wh." prefix), relative to it, one a line; "..." ends a list that did not fit. */
    char tar_names[1024];
};

/* Read SRC_FD to its end and decode it onto W (which stays open: the caller finishes or
 * aborts it).  RAW goes to offset 0 onwards; a QCOW2 is converted.  0, -errno, -CDM_E*; the
 * message in CTX.  A stream that decodes to more than the writer's size is -CDM_ETOOSMALL. */
int cdm_stream_fd(cdm_ctx *ctx, int src_fd, cdm_writer *w, const struct cdm_stream_opts *opts,
                  struct cdm_stream_result *res);

/* The same decoding for bytes the caller pushes (a request body arriving in pieces):
 * open, push the bytes in order, finish (or free without finishing to give up).  Each call
 * holds CTX like an operation; 0 or an error with the message in CTX, and after a failure
 * every later push or finish returns it again.  W stays the caller's. */
typedef struct cdm_stream cdm_stream;
int cdm_stream_open(cdm_ctx *ctx, cdm_writer *w, const struct cdm_stream_opts *opts,
                    cdm_stream **out);
int cdm_stream_push(cdm_stream *s, const void *buf, size_t len);
int cdm_stream_finish(cdm_stream *s, struct cdm_stream_result *res);
/* Bytes pushed so far. */
uint64_t cdm_stream_bytes_in(const cdm_stream *s);
void cdm_stream_free(cdm_stream *s);
/* ---- Remote sources (http.c, source.c; libcurl) ----------------------------------------
 * A source is read either at random (byte ranges, several connections at once: one per
 * worker) or as one sequential stream decoded on the fly (cdm_source_stream).  Failed
 * requests are retried from the last byte received. */
typedef struct cdm_source cdm_source;

enum cdm_http_flags {
    CDM_HTTP_INSECURE = 1,        /* do not verify the server's certificate */
    CDM_HTTP_NO_RANGES = 2        /* never ask for byte ranges */
};

/* Asked for new credentials when a request of a stream (cdm_source_stream) is answered 401,
 * e.g. a Bearer token that expired mid-download: write one "Name: value" line, NUL-terminated,
 * into HEADER (CAP bytes; it replaces the extra header of that name) and return 0, and the
 * request is made again from where the stream stands; nonzero keeps the 401.  Asked at most
 * 3 times per request, from the thread running the stream (ABI 4). */
typedef int (*cdm_reauth_fn)(void *opaque, char *header, size_t cap);

struct cdm_http_opts {
    const char *url;              /* http:// or https:// without user information */
    const char *user;             /* basic auth user, or NULL */
    const char *password;
    const char *ca_pem;           /* PEM certificates trusted besides the system's, or NULL */
    const char *proxy_ca_pem;     /* the same for an HTTPS proxy, or NULL */
    const char *headers;          /* extra request headers, "Name: value" lines, or NULL */
    const char *user_agent;       /* NULL: "cdimover" */
    uint32_t flags;               /* CDM_HTTP_* */
    uint32_t max_redirects;       /* redirects followed at most; 0 = 10 */
    uint32_t retries;             /* repetitions of a failed request */
    uint32_t retry_delay_ms;      /* first pause before a retry, doubled each time (max 10 s) */
    uint32_t idle_timeout;        /* seconds below 1 KiB/s before giving up; 0 = 600 */
    uint32_t connect_timeout;     /* seconds; 0 = 30 */
    cdm_reauth_fn reauth;         /* NULL: a 401 is final */
    void *reauth_opaque;
};

struct cdm_source_info {
    uint64_t size;                /* bytes, when size_known */
    uint64_t bytes_fetched;       /* body bytes received so far by every request */
    uint64_t requests;            /* requests made */
    uint32_t retries;             /* requests repeated after a failure */
    uint32_t restarts;            /* streams restarted from byte 0 (no ranges) */
    int size_known;
    int ranges;                   /* byte ranges are served */
    int http_version;             /* 1 or 2 */
    int status;                   /* status of the last failed request, else of the first */
    char etag[256];
    char last_modified[64];
    char content_type[128];
    char url[2048];               /* after redirects */
};

/* Open URL: one request (a range of the first bytes) learns the size, whether ranges are
 * served, the validators (ETag, Last-Modified) and the first bytes.  0, -errno, -CDM_EHTTP,
 * -CDM_ETLS, -CDM_ENETWORK, -CDM_EPROTOCOL; the message in CTX. */
int cdm_http_open(cdm_ctx *ctx, const struct cdm_http_opts *opts, cdm_source **out);
void cdm_source_free(cdm_source *src);
int cdm_source_info(const cdm_source *src, struct cdm_source_info *out);
/* Read exactly LEN bytes at OFF (the first bytes come from what the open fetched; beyond
 * them only when ranges are served: -ESPIPE otherwise). */
int cdm_source_pread(cdm_ctx *ctx, cdm_source *src, void *buf, size_t len, uint64_t off);
/* RAW copy of the whole source by ranges (OPTS->size = its size; scan_method and map_fd are
 * ignored).  With HASH, the bytes are hashed in offset order into RES->digest. */
int cdm_source_copy(cdm_ctx *ctx, cdm_source *src, int dst_fd, const struct cdm_copy_opts *opts,
                    int hash, struct cdm_copy_stats *stats, struct cdm_stream_result *res);
int cdm_source_qcow2_inspect(cdm_ctx *ctx, cdm_source *src, struct cdm_qcow2_info *out);
/* QCOW2 conversion by ranges: metadata, then only the allocated clusters. */
int cdm_source_qcow2_convert(cdm_ctx *ctx, cdm_source *src, int dst_fd,
                             const struct cdm_copy_opts *opts, struct cdm_copy_stats *stats);
/* The whole source as one stream through the decoders of cdm_stream_fd onto W.  A broken
 * transfer resumes at the last byte received when ranges are served, and restarts from
 * byte 0 otherwise. */
int cdm_source_stream(cdm_ctx *ctx, cdm_source *src, cdm_writer *w,
                      const struct cdm_stream_opts *opts, struct cdm_stream_result *res);
/* cffi:end */

#endif /* CDIMOVER_H */
