/* qcow2.h -- internal declarations of the QCOW2 reader (qcow2.c) used by the conversion job
 * (convert.c) and the fuzz harness: the validated image, the fixed-size metadata cache, the
 * guest-range mapper and the decompressors.  Not part of the public API; internal.h does not
 * include this file.
 *
 * Offsets are named *_guest (virtual disk) or *_host (image file) and never mixed.  Every value
 * read from the image is validated before use against the file size and the hard caps below;
 * no allocation depends on a value from the image except through those caps.
 */
#ifndef CDIMOVER_QCOW2_H
#define CDIMOVER_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define QCOW2_MAGIC 0x514649fbu                 /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9u
#define QCOW2_MAX_CLUSTER_BITS 21u              /* 2 MiB, qemu's implementation limit */
#define QCOW2_MIN_EXTL2_CLUSTER_BITS 14u        /* extended L2 needs clusters >= 16 KiB */
#define QCOW2_MAX_L1_BYTES (32u << 20)          /* qemu's QCOW_MAX_L1_SIZE */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)     /* qemu's QCOW_MAX_REFTABLE_SIZE */
#define QCOW2_MAX_SNAPSHOTS 65536u              /* qemu's QCOW_MAX_SNAPSHOTS */
#define QCOW2_MAX_SNAPSHOT_TABLE (64u << 20)    /* qemu's QCOW_MAX_SNAPSHOTS_SIZE */
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u          /* qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA */
#define QCOW2_MAX_VIRTUAL_SIZE (1ull << 56)     /* L1/L2 layout limit (exclusive) */
#define QCOW2_MAX_NAME 1023u                    /* longest backing file name */
#define QCOW2_MAX_BACKING_FORMAT 15u            /* longest backing format (qemu's 16-byte field) */
#define QCOW2_SUBCLUSTERS 32u                   /* per cluster with extended L2 entries */

/* Header extension types. */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* Feature bits. */
#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN 0x1full
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

/* Metadata cache: QCOW2_CACHE_SETS x QCOW2_CACHE_WAYS slices of at most QCOW2_SLICE_MAX bytes
 * (1 MiB in all), shared by the workers under one mutex. */
#define QCOW2_SLICE_MAX 4096u
#define QCOW2_CACHE_SETS 64u
#define QCOW2_CACHE_WAYS 4u
#define QCOW2_META_READ (64u * 1024)   /* at most one read of metadata (see cache_slice) */

/* What a guest range reads as. */
enum qcow2_kind {
    QCOW2_DATA = 0,         /* host bytes at RUN.host_off */
    QCOW2_ZERO = 1,         /* all-zeroes flag (with or without a preallocated host cluster) */
    QCOW2_UNALLOCATED = 2,  /* no data: zeros (backing files are refused) */
    QCOW2_COMPRESSED = 3    /* one compressed cluster */
};

/* A metadata region of the image file that data must not overlap. */
struct qcow2_region {
    uint64_t start_host;
    uint64_t end_host;
    const char *what;
};

/* An opened, validated image: the header facts plus derived shifts and masks. */
struct qcow2_image {
    struct cdm_reader *src;         /* the image file: every byte is read through it */
    struct cdm_qcow2_info info;     /* what cdm_qcow2_inspect reports */
    uint64_t file_size;
    uint64_t virtual_size;
    uint64_t cluster_size;
    uint32_t cluster_bits;
    uint32_t l2_bits;               /* log2(entries per L2 table) */
    uint32_t l1_shift;              /* cluster_bits + l2_bits: guest bytes per L1 entry, log2 */
    uint32_t entry_bytes;           /* 8, or 16 with extended L2 entries */
    uint32_t subcluster_bits;       /* log2(subcluster size); == cluster_bits without ext. L2 */
    uint32_t slice;                 /* metadata cache slice size: min(cluster_size, 4 KiB) */
    uint64_t l1_off_host;
    uint64_t l1_entries;            /* l1_size as validated */
    uint32_t csize_shift;           /* compressed descriptor: sector count shift */
    uint64_t csize_mask;
    uint64_t coffset_mask;
    bool extended_l2;
    unsigned n_regions;
    struct qcow2_region regions[4]; /* header cluster, L1, refcount table, snapshot table */
};

/* A run of guest bytes that read the same way. */
struct qcow2_run {
    enum qcow2_kind kind;
    uint64_t guest_off;             /* start of the run */
    uint64_t length;                /* bytes, > 0 */
    uint64_t host_off;              /* DATA: host offset of guest_off; COMPRESSED: data start */
    uint64_t csize;                 /* COMPRESSED: compressed bytes present in the file */
    uint64_t cluster_guest;         /* COMPRESSED: guest offset of the cluster */
};

/* One decoded L2 entry: what the guest cluster it maps reads as. */
struct qcow2_entry {
    enum qcow2_kind kind;           /* for standard entries without subclusters */
    uint64_t host;                  /* cluster host offset, or compressed data start */
    uint64_t csize;                 /* COMPRESSED: compressed bytes present in the file */
    uint32_t alloc;                 /* extended L2: allocated subclusters */
    uint32_t zero;                  /* extended L2: zero subclusters */
};

/* Fixed-size, set-associative cache of metadata slices (L1 and L2 tables). */
struct qcow2_cache {
    pthread_mutex_t lock;
    const struct qcow2_image *img;
    uint8_t *mem;                   /* SETS * WAYS * img->slice bytes */
    uint8_t *bounce;                /* QCOW2_META_READ bytes: one metadata read */
    uint64_t tick;
    uint64_t key_host[QCOW2_CACHE_SETS * QCOW2_CACHE_WAYS];   /* slice offset or UINT64_MAX */
    uint64_t stamp[QCOW2_CACHE_SETS * QCOW2_CACHE_WAYS];
    uint64_t hits;
    uint64_t misses;
};

/* One decompressor per concurrent user, handed out by a small pool. */
struct qcow2_decoder {
    void *deflate;                  /* libdeflate decompressor, when built with it */
    void *zstream;                  /* z_stream *, when built without libdeflate */
    void *zstd;                     /* ZSTD_DCtx *, when built with zstd */
};

struct qcow2_decoders {
    pthread_mutex_t lock;
    bool busy[CDM_MAX_THREADS + 1];
    struct qcow2_decoder dec[CDM_MAX_THREADS + 1];
};

/* Every error path records its message in a struct cdm_error (side CDM_SIDE_SOURCE). */

int qcow2_open(struct qcow2_image *img, struct cdm_reader *src, struct cdm_error *err);
bool qcow2_compression_supported(uint32_t compression_type);
int qcow2_refuse(const struct qcow2_image *img, struct cdm_error *err);

int qcow2_decode_l1(const struct qcow2_image *img, uint64_t l1_index, uint64_t e,
                    uint64_t *l2_host, struct cdm_error *err);
int qcow2_decode_l2(const struct qcow2_image *img, uint64_t l2_host, uint64_t cluster_guest,
                    uint64_t e, uint64_t bitmap, struct qcow2_entry *d, struct cdm_error *err);
int qcow2_check_data(const struct qcow2_image *img, uint64_t l2_host, uint64_t cluster_guest,
                     const struct qcow2_entry *d, struct cdm_error *err);

int qcow2_cache_init(struct qcow2_cache *c, const struct qcow2_image *img);
void qcow2_cache_fini(struct qcow2_cache *c);
int qcow2_map(struct qcow2_cache *c, uint64_t guest_off, uint64_t max_len,
              struct qcow2_run *run, struct cdm_error *err);

void qcow2_decoders_init(struct qcow2_decoders *p);
void qcow2_decoders_fini(struct qcow2_decoders *p);
struct qcow2_decoder *qcow2_decoder_get(struct qcow2_decoders *p);
void qcow2_decoder_put(struct qcow2_decoders *p, struct qcow2_decoder *d);
int qcow2_decompress(const struct qcow2_image *img, struct qcow2_decoder *d,
                     const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len,
                     uint64_t cluster_guest, size_t *in_used, struct cdm_error *err);

#endif /* CDIMOVER_QCOW2_H */
