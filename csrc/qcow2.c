/* qcow2.c -- the QCOW2 reader: header parsing and validation, a fixed-size metadata cache,
 * the mapping of guest ranges through the L1/L2 tables into runs of one kind (DATA, ZERO,
 * UNALLOCATED, COMPRESSED), and decompression of compressed clusters (raw deflate, zstd).
 * The L1/L2 entry decoders and the refusals are shared with the streaming converter
 * (qcow2_stream.c), which validates the same way without random access.
 *
 * The image is untrusted input.  Every header field and every table entry is checked before
 * it is used: offsets must be aligned, inside the file and clear of the header and of the
 * other metadata; sizes are checked against the virtual size, the file size and hard caps;
 * reserved bits must be clear.  Arithmetic on image values is done where the operands are
 * already bounded (offsets < 2^56, lengths <= 4 MiB), so it cannot overflow.  Memory does not
 * depend on the image except through caps: the header cluster (<= 2 MiB) while opening, and
 * a 1 MiB metadata cache.  Backing and data files are reported by name, never opened.
 * Layout reference: qemu's docs/interop/qcow2.txt.
 */
#include <errno.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef CDM_HAVE_LIBDEFLATE
#include <libdeflate.h>
#else
#include <zlib.h>
#endif
#ifdef CDM_HAVE_ZSTD
#include <zstd.h>
#endif

#include "qcow2.h"

#define L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define L1E_RESERVED 0x7f000000000001ffull
#define L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define L2E_RESERVED 0x3f000000000001feull
#define L2E_COMPRESSED (1ull << 62)
#define L2E_COPIED (1ull << 63)
#define L2E_ZERO 1ull
#define V2_HEADER_LENGTH 72u
#define V3_MIN_HEADER_LENGTH 104u
#define SNAPSHOT_FIXED 40u

#define HX(v) ((unsigned long long)(v))

static uint16_t be16(const uint8_t *p)
{
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

/* Record a failure of the image (the source) in ERR, first one winning; returns its code. */
#define fail(err, rc, ...) cdm_error_set((err), CDM_SIDE_SOURCE, (rc), __VA_ARGS__)

/* Read LEN bytes of metadata at OFF_HOST through the image's reader, zero-filling what lies
 * past the end of the image as it was opened.  FLAGS: CDM_READ_CACHED for small reads of
 * neighbours (the page cache keeps them), or 0: O_DIRECT where BUF and OFF_HOST are aligned,
 * nothing left in the page cache.  0 or -errno (-EIO when the image has shrunk since). */
static int read_at(const struct qcow2_image *img, void *buf, size_t len, uint64_t off_host,
                   unsigned flags, struct cdm_error *err, const char *what)
{
    size_t avail = off_host >= img->file_size
                       ? 0
                       : (size_t)CDM_MIN((uint64_t)len, img->file_size - off_host);
    if (avail < len)
        memset((uint8_t *)buf + avail, 0, len - avail);
    if (avail == 0)
        return 0;
    struct cdm_io io;
    memset(&io, 0, sizeof io);
    int rc = cdm_read(img->src, buf, avail, off_host, flags, &io);
    if (rc < 0)
        return fail(err, rc, "reading %s at host offset 0x%llx: %s", what, HX(off_host),
                    io.error.msg);
    return 0;
}

/* True when [START, START+LEN) lies inside the file. */
static bool in_file(const struct qcow2_image *img, uint64_t start, uint64_t len)
{
    return start <= img->file_size && len <= img->file_size - start;
}

/* The metadata region that [START, END) overlaps, or NULL. */
static const char *overlap(const struct qcow2_image *img, uint64_t start, uint64_t end)
{
    for (unsigned i = 0; i < img->n_regions; i++) {
        const struct qcow2_region *r = &img->regions[i];
        if (start < r->end_host && r->start_host < end)
            return r->what;
    }
    return NULL;
}

/* Check a cluster-aligned table of LEN bytes at OFF_HOST: aligned, after the header cluster,
 * inside the file. */
static int check_table(const struct qcow2_image *img, const char *what, uint64_t off_host,
                       uint64_t len, struct cdm_error *err)
{
    if (off_host & (img->cluster_size - 1))
        return fail(err, -CDM_EFORMAT, "%s offset 0x%llx is not aligned to the cluster size %llu",
                    what, HX(off_host), HX(img->cluster_size));
    if (off_host < img->cluster_size)
        return fail(err, -CDM_EFORMAT, "%s offset 0x%llx points into the header cluster", what,
                    HX(off_host));
    if (len == 0 && off_host >= img->file_size)
        return fail(err, -CDM_EFORMAT, "%s offset 0x%llx is past the end of the file (file size "
                    "%llu)", what, HX(off_host), HX(img->file_size));
    if (!in_file(img, off_host, len))
        return fail(err, -CDM_EFORMAT,
                    "%s (host offset 0x%llx, %llu bytes) extends past the end of the file "
                    "(file size %llu)",
                    what, HX(off_host), HX(len), HX(img->file_size));
    return 0;
}

static int add_region(struct qcow2_image *img, uint64_t start, uint64_t len, const char *what,
                      struct cdm_error *err)
{
    const char *other = overlap(img, start, start + len);
    if (other != NULL)
        return fail(err, -CDM_EFORMAT, "%s (host offset 0x%llx, %llu bytes) overlaps %s", what,
                    HX(start), HX(len), other);
    img->regions[img->n_regions++] = (struct qcow2_region){start, start + len, what};
    return 0;
}

/* Walk the snapshot table to learn its size and check each entry's bounds.  The table is
 * only validated, never used: the active layer is what gets converted. */
static int check_snapshots(struct qcow2_image *img, uint64_t off_host, uint32_t n,
                           uint64_t *table_bytes, struct cdm_error *err)
{
    uint64_t pos = 0, end = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t e[SNAPSHOT_FIXED];
        if (!in_file(img, off_host + pos, SNAPSHOT_FIXED))
            return fail(err, -CDM_EFORMAT,
                        "snapshot table entry %u (host offset 0x%llx) extends past the end of "
                        "the file (file size %llu)",
                        i, HX(off_host + pos), HX(img->file_size));
        int rc = read_at(img, e, sizeof e, off_host + pos, CDM_READ_CACHED, err,
                         "the snapshot table");
        if (rc < 0)
            return rc;
        uint64_t l1_off = be64(e);
        uint32_t l1_size = be32(e + 8);
        uint32_t extra = be32(e + 36);
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA)
            return fail(err, -CDM_EFORMAT,
                        "snapshot %u has %u bytes of extra data (at most %u are allowed)", i,
                        extra, QCOW2_MAX_SNAPSHOT_EXTRA);
        if (l1_size > QCOW2_MAX_L1_BYTES / 8)
            return fail(err, -CDM_EFORMAT, "snapshot %u has an L1 table of %u entries (too large)",
                        i, l1_size);
        if (l1_size > 0 && (l1_off & (img->cluster_size - 1)))
            return fail(err, -CDM_EFORMAT,
                        "snapshot %u L1 table offset 0x%llx is not cluster-aligned", i,
                        HX(l1_off));
        /* qemu does not write the padding after the last entry: only the unpadded end of
         * each entry must be in the file. */
        uint64_t len = (uint64_t)SNAPSHOT_FIXED + extra + be16(e + 12) + be16(e + 14);
        if (!in_file(img, off_host + pos, len))
            return fail(err, -CDM_EFORMAT,
                        "snapshot table entry %u (host offset 0x%llx, %llu bytes) extends past "
                        "the end of the file (file size %llu)",
                        i, HX(off_host + pos), HX(len), HX(img->file_size));
        end = pos + len;
        pos += CDM_ALIGN_UP(len, 8);
        if (pos > QCOW2_MAX_SNAPSHOT_TABLE)
            return fail(err, -CDM_EFORMAT, "snapshot table is larger than %u bytes",
                        QCOW2_MAX_SNAPSHOT_TABLE);
    }
    *table_bytes = end;
    return 0;
}

/* Copy a length-delimited string of the header into DST (capacity CAP), NUL-terminated and
 * truncated to CAP - 1 bytes. */
static void copy_name(char *dst, size_t cap, const uint8_t *src, size_t len)
{
    if (len > cap - 1)
        len = cap - 1;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* Parse the header extensions in [START, END) of the header cluster HC. */
static int parse_extensions(struct qcow2_image *img, const uint8_t *hc, uint64_t start,
                            uint64_t end, struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    bool seen_format = false, seen_data = false, seen_crypto = false;
    uint64_t pos = start;
    while (pos + 8 <= end) {
        uint32_t type = be32(hc + pos);
        uint32_t len = be32(hc + pos + 4);
        if (type == QCOW2_EXT_END)
            break;
        if (len > end - pos - 8)
            return fail(err, -CDM_EFORMAT,
                        "header extension 0x%08x at offset %llu has length %u, past the end of "
                        "the extension area (%llu bytes)",
                        type, HX(pos), len, HX(end));
        const uint8_t *data = hc + pos + 8;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (seen_format)
                return fail(err, -CDM_EFORMAT, "two backing format header extensions");
            if (!info->has_backing)
                return fail(err, -CDM_EFORMAT,
                            "backing format header extension in an image without a backing "
                            "file");
            if (len > QCOW2_MAX_BACKING_FORMAT)
                return fail(err, -CDM_EFORMAT,
                            "backing format header extension is %u bytes long (at most %u)",
                            len, QCOW2_MAX_BACKING_FORMAT);
            copy_name(info->backing_format, sizeof info->backing_format, data, len);
            seen_format = true;
            break;
        case QCOW2_EXT_DATA_FILE:
            if (seen_data)
                return fail(err, -CDM_EFORMAT, "two external data file header extensions");
            copy_name(info->data_file_name, sizeof info->data_file_name, data, len);
            info->has_data_file = 1;
            seen_data = true;
            break;
        case QCOW2_EXT_CRYPTO:
            if (seen_crypto)
                return fail(err, -CDM_EFORMAT, "two encryption header extensions");
            if (info->crypt_method != CDM_QCOW2_CRYPT_LUKS)
                return fail(err, -CDM_EFORMAT,
                            "encryption header extension in an image whose encryption method "
                            "is %u (only LUKS has one)",
                            info->crypt_method);
            if (len != 16)
                return fail(err, -CDM_EFORMAT,
                            "encryption header extension is %u bytes long (expected 16)", len);
            seen_crypto = true;
            break;
        case QCOW2_EXT_BITMAPS:
            info->has_bitmaps = 1;   /* bitmaps are not needed to read the disk */
            break;
        default:                     /* feature name table and unknown extensions */
            break;
        }
        pos += 8 + CDM_ALIGN_UP((uint64_t)len, 8);
    }
    return 0;
}

/* Decide what the feature bits and the compression type field say; V3 is the header. */
static int parse_features(struct qcow2_image *img, const uint8_t *h, uint32_t header_length,
                          struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    uint64_t incompat = be64(h + 72);
    info->incompatible_features = incompat;
    info->compatible_features = be64(h + 80);
    info->autoclear_features = be64(h + 88);
    info->refcount_order = be32(h + 96);
    if (incompat & ~QCOW2_INCOMPAT_KNOWN)
        return fail(err, -CDM_EUNSUPPORTED, "unknown incompatible feature bits 0x%llx",
                    HX(incompat & ~QCOW2_INCOMPAT_KNOWN));
    if (info->refcount_order > 6)
        return fail(err, -CDM_EFORMAT, "refcount order %u is too large (at most 6)",
                    info->refcount_order);
    info->dirty = (incompat & QCOW2_INCOMPAT_DIRTY) != 0;
    info->corrupt = (incompat & QCOW2_INCOMPAT_CORRUPT) != 0;
    if (incompat & QCOW2_INCOMPAT_DATA_FILE)
        info->has_data_file = 1;
    info->data_file_raw = (info->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
    if (info->data_file_raw && !(incompat & QCOW2_INCOMPAT_DATA_FILE))
        return fail(err, -CDM_EFORMAT,
                    "the raw external data bit (autoclear bit 1) is set without the external "
                    "data file bit (incompatible bit 2)");
    info->lazy_refcounts = (info->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0;
    info->extended_l2 = (incompat & QCOW2_INCOMPAT_EXTL2) != 0;
    info->compression_type = header_length > 104 ? h[104] : 0;
    bool bit = (incompat & QCOW2_INCOMPAT_COMPRESSION) != 0;
    if (bit && header_length <= 104)
        return fail(err, -CDM_EFORMAT,
                    "the compression type feature bit is set but the header (%u bytes) has no "
                    "compression type field",
                    header_length);
    if (bit && info->compression_type == CDM_QCOW2_COMPRESSION_ZLIB)
        return fail(err, -CDM_EFORMAT,
                    "the compression type feature bit is set but the compression type is zlib");
    if (!bit && info->compression_type != CDM_QCOW2_COMPRESSION_ZLIB)
        return fail(err, -CDM_EFORMAT,
                    "compression type %u is set without the compression type feature bit",
                    info->compression_type);
    if (info->compression_type > CDM_QCOW2_COMPRESSION_ZSTD)
        return fail(err, -CDM_EUNSUPPORTED, "unknown compression type %u",
                    info->compression_type);
    if (info->extended_l2 && img->cluster_bits < QCOW2_MIN_EXTL2_CLUSTER_BITS)
        return fail(err, -CDM_EFORMAT,
                    "extended L2 entries need clusters of at least 16 KiB (cluster size %llu)",
                    HX(img->cluster_size));
    return 0;
}

/* The backing file name: inside the header cluster HC, after the header.  *EXT_END becomes
 * the end of the extension area. */
static int parse_backing_name(struct qcow2_image *img, const uint8_t *hc, uint64_t *ext_end,
                              struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    uint32_t hlen = info->header_length;
    uint64_t backing_off = be64(hc + 8);
    uint32_t backing_len = be32(hc + 16);
    if (backing_off != 0) {
        if (backing_off < hlen || backing_off >= img->cluster_size)
            return fail(err, -CDM_EFORMAT,
                        "backing file name offset 0x%llx is not inside the header cluster "
                        "after the header",
                        HX(backing_off));
        if (backing_len > QCOW2_MAX_NAME || backing_len > img->cluster_size - backing_off)
            return fail(err, -CDM_EFORMAT, "backing file name of %u bytes is too long",
                        backing_len);
        if (!in_file(img, backing_off, backing_len))
            return fail(err, -CDM_EFORMAT, "backing file name extends past the end of the file");
        copy_name(info->backing_name, sizeof info->backing_name, hc + backing_off, backing_len);
        info->has_backing = 1;
        *ext_end = backing_off;
    }
    return 0;
}

/* The virtual size and the active L1 table, whose region is registered. */
static int parse_l1(struct qcow2_image *img, const uint8_t *hc, struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    int rc;
    uint64_t size = be64(hc + 24);
    if (size % 512 != 0)
        return fail(err, -CDM_EFORMAT, "virtual size %llu is not a multiple of 512", HX(size));
    if (size >= QCOW2_MAX_VIRTUAL_SIZE)
        return fail(err, -CDM_EFORMAT, "virtual size %llu is not below 2^56", HX(size));
    img->virtual_size = info->virtual_size = size;
    uint64_t l1_needed = (size + (1ull << img->l1_shift) - 1) >> img->l1_shift;
    uint32_t l1_size = be32(hc + 36);
    uint64_t l1_off = be64(hc + 40);
    info->l1_size = l1_size;
    info->l1_table_offset = l1_off;
    if (l1_size > QCOW2_MAX_L1_BYTES / 8)
        return fail(err, -CDM_EFORMAT, "L1 table of %u entries is too large (at most %u)",
                    l1_size, QCOW2_MAX_L1_BYTES / 8);
    if (l1_size < l1_needed)
        return fail(err, -CDM_EFORMAT,
                    "L1 table of %u entries is too small for the virtual size %llu (needs %llu)",
                    l1_size, HX(size), HX(l1_needed));
    img->l1_off_host = l1_off;
    img->l1_entries = l1_size;

    /* The header cluster is metadata: nothing may point into it. */
    rc = add_region(img, 0, img->cluster_size, "the header cluster", err);
    if (rc < 0)
        return rc;
    if (l1_size > 0) {
        rc = check_table(img, "L1 table", l1_off, (uint64_t)l1_size * 8, err);
        if (rc == 0)
            rc = add_region(img, l1_off, (uint64_t)l1_size * 8, "the L1 table", err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* The refcount and snapshot tables: not needed to read, but they must be where the header
 * says, inside the file and clear of the other metadata. */
static int parse_tables(struct qcow2_image *img, const uint8_t *hc, struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    int rc;
    uint64_t rt_off = be64(hc + 48);
    uint32_t rt_clusters = be32(hc + 56);
    info->refcount_table_offset = rt_off;
    info->refcount_table_clusters = rt_clusters;
    if (rt_clusters == 0)
        return fail(err, -CDM_EFORMAT, "the image has no refcount table");
    uint64_t rt_len = (uint64_t)rt_clusters << img->cluster_bits;
    if (rt_len > QCOW2_MAX_REFTABLE_BYTES)
        return fail(err, -CDM_EFORMAT, "refcount table of %u clusters is too large",
                    rt_clusters);
    rc = check_table(img, "refcount table", rt_off, rt_len, err);
    if (rc == 0)
        rc = add_region(img, rt_off, rt_len, "the refcount table", err);
    if (rc < 0)
        return rc;

    /* Snapshot table: checked and skipped. */
    uint32_t nb = be32(hc + 60);
    uint64_t sn_off = be64(hc + 64);
    info->nb_snapshots = nb;
    info->snapshots_offset = sn_off;
    if (nb > QCOW2_MAX_SNAPSHOTS)
        return fail(err, -CDM_EFORMAT, "%u snapshots is too many (at most %u)", nb,
                    QCOW2_MAX_SNAPSHOTS);
    if (nb > 0) {
        uint64_t sn_len = 0;
        rc = check_table(img, "snapshot table", sn_off, 0, err);
        if (rc == 0)
            rc = check_snapshots(img, sn_off, nb, &sn_len, err);
        if (rc == 0)
            rc = add_region(img, sn_off, sn_len, "the snapshot table", err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Everything after the fixed header: backing file name, extensions, tables and regions.  HC
 * is the header cluster (zero-filled past the end of the file). */
static int parse_rest(struct qcow2_image *img, const uint8_t *hc, struct cdm_error *err)
{
    uint64_t ext_end = img->cluster_size;
    int rc = parse_backing_name(img, hc, &ext_end, err);
    if (rc == 0)
        rc = parse_extensions(img, hc, img->info.header_length, ext_end, err);
    if (rc == 0)
        rc = parse_l1(img, hc, err);
    if (rc == 0)
        rc = parse_tables(img, hc, err);
    return rc;
}

/* Open the image that SRC reads as a QCOW2 image: read and validate the header, the header
 * extensions and the placement of the metadata tables, and fill IMG (including IMG->info).
 * ERR receives the message.  0, -errno, -CDM_EFORMAT (malformed) or -CDM_EUNSUPPORTED (unknown version,
 * incompatible feature, compression type, or clusters above 2 MiB).  Backing files, data
 * files, encryption and the corrupt bit are reported in IMG->info, not refused. */
int qcow2_open(struct qcow2_image *img, struct cdm_reader *src, struct cdm_error *err)
{
    struct cdm_qcow2_info *info = &img->info;
    uint8_t h[112];
    memset(img, 0, sizeof *img);
    img->src = src;
    cdm_error_clear(err);

    img->file_size = src->size;
    info->file_size = img->file_size;
    size_t got = (size_t)CDM_MIN((uint64_t)sizeof h, img->file_size);
    int rc = read_at(img, h, sizeof h, 0, CDM_READ_CACHED, err, "the QCOW2 header");
    if (rc < 0)
        return rc;
    if (got < 4 || be32(h) != QCOW2_MAGIC)
        return fail(err, -CDM_EFORMAT, "not a QCOW2 image (no QFI\\xfb magic at offset 0)");
    if (got < V2_HEADER_LENGTH)
        return fail(err, -CDM_EFORMAT, "QCOW2 header truncated: the file has only %zu bytes",
                    got);

    info->version = be32(h + 4);
    if (info->version != 2 && info->version != 3)
        return fail(err, -CDM_EUNSUPPORTED, "QCOW2 version %u is not supported (only 2 and 3)",
                    info->version);
    uint32_t cb = be32(h + 20);
    info->cluster_bits = cb;
    if (cb < QCOW2_MIN_CLUSTER_BITS)
        return fail(err, -CDM_EFORMAT, "cluster_bits %u is below the minimum of 9", cb);
    if (cb > QCOW2_MAX_CLUSTER_BITS)
        return fail(err, -CDM_EUNSUPPORTED,
                    "cluster size 2^%u is not supported (at most 2 MiB)", cb);
    img->cluster_bits = cb;
    img->cluster_size = 1ull << cb;
    info->crypt_method = be32(h + 32);

    if (info->version == 2) {
        info->header_length = V2_HEADER_LENGTH;
        info->refcount_order = 4;
    } else {
        if (got < V3_MIN_HEADER_LENGTH)
            return fail(err, -CDM_EFORMAT,
                        "QCOW2 version 3 header truncated: the file has only %zu bytes", got);
        uint32_t hlen = be32(h + 100);
        info->header_length = hlen;
        if (hlen < V3_MIN_HEADER_LENGTH || hlen % 8 != 0 || hlen > img->cluster_size)
            return fail(err, -CDM_EFORMAT,
                        "header length %u is invalid (a multiple of 8 from 104 to the cluster "
                        "size %llu)",
                        hlen, HX(img->cluster_size));
        if (hlen > img->file_size)
            return fail(err, -CDM_EFORMAT, "QCOW2 header of %u bytes is truncated (file size %llu)",
                        hlen, HX(img->file_size));
        rc = parse_features(img, h, hlen, err);
        if (rc < 0)
            return rc;
    }
    img->extended_l2 = info->extended_l2 != 0;
    info->compression_supported = qcow2_compression_supported(info->compression_type);
    img->entry_bytes = img->extended_l2 ? 16 : 8;
    img->l2_bits = cb - (img->extended_l2 ? 4 : 3);
    img->l1_shift = cb + img->l2_bits;
    img->subcluster_bits = img->extended_l2 ? cb - 5 : cb;
    img->slice = (uint32_t)CDM_MIN(img->cluster_size, (uint64_t)QCOW2_SLICE_MAX);
    img->csize_shift = 62 - (cb - 8);
    img->csize_mask = (1ull << (cb - 8)) - 1;
    img->coffset_mask = (1ull << img->csize_shift) - 1;

    /* The header cluster holds the extensions and the backing file name. */
    uint8_t *hc = cdm_alloc_aligned(img->cluster_size);
    if (hc == NULL)
        return fail(err, -ENOMEM, "cannot allocate %llu bytes for the header cluster",
                    HX(img->cluster_size));
    rc = read_at(img, hc, img->cluster_size, 0, 0, err, "the header cluster");
    if (rc == 0)
        rc = parse_rest(img, hc, err);
    free(hc);
    return rc;
}

/* True when this build can decompress clusters of COMPRESSION_TYPE. */
bool qcow2_compression_supported(uint32_t compression_type)
{
    if (compression_type == CDM_QCOW2_COMPRESSION_ZLIB)
        return true;
#ifdef CDM_HAVE_ZSTD
    if (compression_type == CDM_QCOW2_COMPRESSION_ZSTD)
        return true;
#endif
    return false;
}

/* Refuse what must not or cannot be converted: a backing or external data file (never
 * opened: -CDM_EUNSAFE), encryption or a compression type this build lacks
 * (-CDM_EUNSUPPORTED), the corrupt bit (-CDM_EFORMAT).  0 when IMG may be converted; otherwise
 * the code, with the message in ERR. */
int qcow2_refuse(const struct qcow2_image *img, struct cdm_error *err)
{
    const struct cdm_qcow2_info *i = &img->info;
    if (i->has_backing)
        return fail(err, -CDM_EUNSAFE,
                    "the image has a backing file \"%s\"; backing files are never opened",
                    i->backing_name);
    if (i->has_data_file)
        return fail(err, -CDM_EUNSAFE,
                    "the image keeps its data in an external data file \"%s\"; data files are "
                    "never opened",
                    i->data_file_name);
    if (i->crypt_method != CDM_QCOW2_CRYPT_NONE)
        return fail(err, -CDM_EUNSUPPORTED,
                    "the image is encrypted (method %u: %s); encrypted images are not supported",
                    i->crypt_method,
                    i->crypt_method == CDM_QCOW2_CRYPT_AES    ? "AES"
                    : i->crypt_method == CDM_QCOW2_CRYPT_LUKS ? "LUKS"
                                                             : "unknown");
    if (i->corrupt)
        return fail(err, -CDM_EFORMAT,
                    "the image is marked corrupt (incompatible feature bit 1); repair it with "
                    "qemu-img check -r all");
    if (!i->compression_supported)
        return fail(err, -CDM_EUNSUPPORTED,
                    "compression type %u (%s) is not supported by this build",
                    i->compression_type,
                    i->compression_type == CDM_QCOW2_COMPRESSION_ZSTD ? "zstd" : "unknown");
    return 0;
}

/* ---- metadata cache -------------------------------------------------------------------- */

/* Set up C for IMG: SETS x WAYS slices of IMG->slice bytes.  0 or -ENOMEM. */
int qcow2_cache_init(struct qcow2_cache *c, const struct qcow2_image *img)
{
    memset(c, 0, sizeof *c);
    c->img = img;
    c->mem = cdm_alloc_aligned((size_t)QCOW2_CACHE_SETS * QCOW2_CACHE_WAYS * img->slice);
    if (c->mem == NULL)
        return -ENOMEM;
    c->bounce = cdm_alloc_aligned(QCOW2_META_READ);
    if (c->bounce == NULL) {
        free(c->mem);
        c->mem = NULL;
        return -ENOMEM;
    }
    for (unsigned i = 0; i < QCOW2_CACHE_SETS * QCOW2_CACHE_WAYS; i++)
        c->key_host[i] = UINT64_MAX;
    pthread_mutex_init(&c->lock, NULL);
    return 0;
}

/* Release C (after a successful qcow2_cache_init). */
void qcow2_cache_fini(struct qcow2_cache *c)
{
    if (c->mem != NULL) {
        pthread_mutex_destroy(&c->lock);
        free(c->mem);
        free(c->bounce);
        c->mem = NULL;
        c->bounce = NULL;
    }
}

/* The way of C that holds SLICE_HOST, or, when none does, the least recently used way of its
 * set (*HIT tells which). */
static unsigned cache_way(const struct qcow2_cache *c, uint64_t slice_host, bool *hit)
{
    uint64_t h = (slice_host / c->img->slice) * 0x9e3779b97f4a7c15ull;
    unsigned base = (unsigned)(h >> 58) % QCOW2_CACHE_SETS * QCOW2_CACHE_WAYS;
    unsigned victim = base;
    for (unsigned i = base; i < base + QCOW2_CACHE_WAYS; i++) {
        if (c->key_host[i] == slice_host) {
            *hit = true;
            return i;
        }
        if (c->stamp[i] < c->stamp[victim])
            victim = i;
    }
    *hit = false;
    return victim;
}

/* Put the slice at SLICE_HOST, SRC, into C unless it is there; its way. */
static unsigned cache_put(struct qcow2_cache *c, uint64_t slice_host, const uint8_t *src)
{
    bool hit;
    unsigned i = cache_way(c, slice_host, &hit);
    if (!hit) {
        memcpy(c->mem + (size_t)i * c->img->slice, src, c->img->slice);
        c->key_host[i] = slice_host;
    }
    c->stamp[i] = ++c->tick;
    return i;
}

/* The cached slice at SLICE_HOST (slice-aligned), loaded on a miss; the lock is held.
 *
 * A miss reads the aligned window from the slice's block to the end of its cluster (at most
 * QCOW2_META_READ bytes) with O_DIRECT, and caches every slice in it: a scan of an L2 table
 * goes forward, one read per 64 KiB instead of one per 4 KiB slice, and neither the tables nor
 * a readahead window around them stays in the page cache, charged to the job (the L2 tables
 * of a 1 TiB image are 128 MiB).  The window's bytes are cached by host offset like any slice,
 * so what else it holds (the next cluster's first bytes, when clusters are small) is only
 * found by a lookup of that offset, with the file's bytes. */
static int cache_slice(struct qcow2_cache *c, uint64_t slice_host, const uint8_t **out,
                       struct cdm_error *err)
{
    const struct qcow2_image *img = c->img;
    bool hit;
    unsigned i = cache_way(c, slice_host, &hit);
    if (hit) {
        c->stamp[i] = ++c->tick;
        c->hits++;
        *out = c->mem + (size_t)i * img->slice;
        return 0;
    }
    uint64_t w0 = CDM_ALIGN_DOWN(slice_host, CDM_ALIGN);
    uint64_t w1 = CDM_MIN(CDM_ALIGN_UP(slice_host + 1, img->cluster_size),
                          w0 + QCOW2_META_READ);
    w1 = CDM_ALIGN_UP(w1, CDM_ALIGN);
    int rc = read_at(img, c->bounce, (size_t)(w1 - w0), w0, 0, err, "metadata");
    if (rc < 0)
        return rc;
    for (uint64_t s = w0; s < w1; s += img->slice) {
        if (s != slice_host)
            cache_put(c, s, c->bounce + (s - w0));
    }
    i = cache_put(c, slice_host, c->bounce + (slice_host - w0));    /* last: never evicted */
    c->misses++;
    *out = c->mem + (size_t)i * img->slice;
    return 0;
}

/* ---- L1/L2 decoding --------------------------------------------------------------------- */

/* Decode L1 entry E of index L1_INDEX of IMG into *L2_HOST (0 when unallocated): reserved
 * bits clear, cluster-aligned, inside the file and clear of the metadata regions.  0 or
 * -CDM_EFORMAT with the message in ERR. */
int qcow2_decode_l1(const struct qcow2_image *img, uint64_t l1_index, uint64_t e,
                     uint64_t *l2_host, struct cdm_error *err)
{
    uint64_t guest = l1_index << img->l1_shift;
    if (e & L1E_RESERVED)
        return fail(err, -CDM_EFORMAT,
                    "L1 entry %llu (guest offset 0x%llx) has reserved bits set (entry 0x%016llx)",
                    HX(l1_index), HX(guest), HX(e));
    uint64_t off = e & L1E_OFFSET_MASK;
    *l2_host = off;
    if (off == 0)
        return 0;
    if (off & (img->cluster_size - 1))
        return fail(err, -CDM_EFORMAT,
                    "L1 entry for guest offset 0x%llx: L2 table offset 0x%llx is not "
                    "cluster-aligned",
                    HX(guest), HX(off));
    if (!in_file(img, off, img->cluster_size))
        return fail(err, -CDM_EFORMAT,
                    "L1 entry for guest offset 0x%llx points outside the file (L2 table at host "
                    "offset 0x%llx, file size %llu)",
                    HX(guest), HX(off), HX(img->file_size));
    const char *what = overlap(img, off, off + img->cluster_size);
    if (what != NULL)
        return fail(err, -CDM_EFORMAT,
                    "L1 entry for guest offset 0x%llx points into %s (L2 table at host offset "
                    "0x%llx)",
                    HX(guest), what, HX(off));
    return 0;
}

/* Check that host range [HOST, HOST+LEN) read for GUEST is in the file and clear of
 * metadata, including the L2 table at L2_HOST that maps it. */
static int check_host_range(const struct qcow2_image *img, uint64_t l2_host, uint64_t guest,
                            uint64_t host, uint64_t len, const char *kind, struct cdm_error *err)
{
    if (!in_file(img, host, len))
        return fail(err, -CDM_EFORMAT,
                    "L2 entry for guest offset 0x%llx points outside the file (%s at host "
                    "offset 0x%llx, %llu bytes, file size %llu)",
                    HX(guest), kind, HX(host), HX(len), HX(img->file_size));
    const char *what = overlap(img, host, host + len);
    if (what == NULL && host < l2_host + img->cluster_size && l2_host < host + len)
        what = "its own L2 table";
    if (what != NULL)
        return fail(err, -CDM_EFORMAT,
                    "L2 entry for guest offset 0x%llx points into %s (%s at host offset 0x%llx)",
                    HX(guest), what, kind, HX(host));
    return 0;
}

/* Decode the L2 entry E (and, with extended L2 entries, the subcluster BITMAP) that maps the
 * guest cluster at CLUSTER_GUEST from the L2 table at L2_HOST into *D, checking reserved bits,
 * alignment and that the host bytes lie inside the file and clear of the metadata (data
 * subclusters are checked by the mapper as it walks them).  0 or -CDM_EFORMAT with the
 * message in ERR. */
int qcow2_decode_l2(const struct qcow2_image *img, uint64_t l2_host, uint64_t cluster_guest,
                     uint64_t e, uint64_t bitmap, struct qcow2_entry *d, struct cdm_error *err)
{
    memset(d, 0, sizeof *d);
    if (e & L2E_COMPRESSED) {
        if (e & L2E_COPIED)
            return fail(err, -CDM_EFORMAT,
                        "compressed L2 entry for guest offset 0x%llx has the COPIED bit set "
                        "(entry 0x%016llx)",
                        HX(cluster_guest), HX(e));
        if (img->extended_l2 && bitmap != 0)
            return fail(err, -CDM_EFORMAT,
                        "compressed L2 entry for guest offset 0x%llx has a subcluster bitmap "
                        "(0x%016llx)",
                        HX(cluster_guest), HX(bitmap));
        uint64_t coff = e & img->coffset_mask;
        uint64_t sectors = ((e >> img->csize_shift) & img->csize_mask) + 1;
        if (coff >= QCOW2_MAX_VIRTUAL_SIZE)
            return fail(err, -CDM_EFORMAT,
                        "compressed L2 entry for guest offset 0x%llx has reserved bits set "
                        "(entry 0x%016llx)",
                        HX(cluster_guest), HX(e));
        uint64_t csize = sectors * 512 - (coff & 511);
        if (coff >= img->file_size || coff + csize > CDM_ALIGN_UP(img->file_size, 512))
            return fail(err, -CDM_EFORMAT,
                        "L2 entry for guest offset 0x%llx points outside the file (compressed "
                        "data at host offset 0x%llx, %llu bytes, file size %llu)",
                        HX(cluster_guest), HX(coff), HX(csize), HX(img->file_size));
        csize = CDM_MIN(csize, img->file_size - coff);
        int rc = check_host_range(img, l2_host, cluster_guest, coff, csize, "compressed data",
                                  err);
        if (rc < 0)
            return rc;
        d->kind = QCOW2_COMPRESSED;
        d->host = coff;
        d->csize = csize;
        return 0;
    }
    if (img->info.version == 2 && (e & L2E_ZERO))
        return fail(err, -CDM_EFORMAT,
                    "L2 entry for guest offset 0x%llx has the zero flag in a version 2 image",
                    HX(cluster_guest));
    uint64_t reserved = L2E_RESERVED | (img->extended_l2 ? L2E_ZERO : 0);
    if (e & reserved)
        return fail(err, -CDM_EFORMAT,
                    "L2 entry for guest offset 0x%llx has reserved bits set (entry 0x%016llx)",
                    HX(cluster_guest), HX(e));
    uint64_t off = e & L2E_OFFSET_MASK;
    if (off & (img->cluster_size - 1))
        return fail(err, -CDM_EFORMAT,
                    "L2 entry for guest offset 0x%llx is not cluster-aligned (host offset 0x%llx)",
                    HX(cluster_guest), HX(off));
    d->host = off;
    if (img->extended_l2) {
        d->alloc = (uint32_t)bitmap;
        d->zero = (uint32_t)(bitmap >> 32);
        if (d->alloc & d->zero)
            return fail(err, -CDM_EFORMAT,
                        "L2 entry for guest offset 0x%llx marks subclusters both allocated and "
                        "zero (bitmap 0x%016llx)",
                        HX(cluster_guest), HX(bitmap));
        if (off == 0 && d->alloc != 0)
            return fail(err, -CDM_EFORMAT,
                        "L2 entry for guest offset 0x%llx has allocated subclusters but no host "
                        "cluster (bitmap 0x%016llx)",
                        HX(cluster_guest), HX(bitmap));
        d->kind = QCOW2_DATA;   /* refined per subcluster */
    } else if (e & L2E_ZERO) {
        d->kind = QCOW2_ZERO;
    } else {
        d->kind = off == 0 ? QCOW2_UNALLOCATED : QCOW2_DATA;
    }
    return 0;
}

/* Check the host bytes that the data entry D (kind QCOW2_DATA) of the guest cluster at
 * CLUSTER_GUEST, from the L2 table at L2_HOST, stores: the whole host cluster, or with
 * extended L2 entries each allocated subcluster.  0 or -CDM_EFORMAT with the message in ERR. */
int qcow2_check_data(const struct qcow2_image *img, uint64_t l2_host, uint64_t cluster_guest,
                     const struct qcow2_entry *d, struct cdm_error *err)
{
    if (!img->extended_l2)
        return check_host_range(img, l2_host, cluster_guest, d->host, img->cluster_size, "data",
                                err);
    uint64_t piece = 1ull << img->subcluster_bits;
    for (unsigned sc = 0; sc < QCOW2_SUBCLUSTERS; sc++) {
        if (!((d->alloc >> sc) & 1))
            continue;
        int rc = check_host_range(img, l2_host, cluster_guest + sc * piece, d->host + sc * piece,
                                  piece, "data", err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Extend RUN (empty when RUN->length == 0) over the standard cluster at CG (decoded as D)
 * from *POS to CEND.  Returns 1 when the run ends inside this cluster, 0 to go on, or <0. */
static int extend_standard(const struct qcow2_image *img, uint64_t l2_host, uint64_t cg,
                           uint64_t cend, const struct qcow2_entry *d, uint64_t *pos,
                           struct qcow2_run *run, struct cdm_error *err)
{
    uint64_t piece = 1ull << img->subcluster_bits;
    while (*pos < cend) {
        uint64_t in = *pos - cg;
        unsigned sc = (unsigned)(in >> img->subcluster_bits);
        uint64_t pend = CDM_MIN(cg + ((uint64_t)sc + 1) * piece, cend);
        enum qcow2_kind k = d->kind;
        if (img->extended_l2)
            k = (d->alloc >> sc) & 1 ? QCOW2_DATA
                : (d->zero >> sc) & 1 ? QCOW2_ZERO
                                      : QCOW2_UNALLOCATED;
        uint64_t host = k == QCOW2_DATA ? d->host + in : 0;
        if (k == QCOW2_DATA) {
            int rc = check_host_range(img, l2_host, *pos, host, pend - *pos, "data", err);
            if (rc < 0)
                return rc;
        }
        if (run->length == 0) {
            run->kind = k;
            run->guest_off = *pos;
            run->host_off = host;
        } else if (k != run->kind || (k == QCOW2_DATA && host != run->host_off + run->length)) {
            return 1;
        }
        run->length += pend - *pos;
        *pos = pend;
    }
    return 0;
}

/* The run from GUEST_OFF: the longest prefix of [GUEST_OFF, GUEST_OFF + MAX_LEN) (clipped
 * to the virtual size) that reads one way, ending at the latest at the end of the L2 slice
 * that maps GUEST_OFF; a compressed run is one cluster.  Thread-safe (C's lock).  0, -errno
 * or -CDM_EFORMAT with the message in ERR. */
int qcow2_map(struct qcow2_cache *c, uint64_t guest_off, uint64_t max_len,
              struct qcow2_run *run, struct cdm_error *err)
{
    const struct qcow2_image *img = c->img;
    memset(run, 0, sizeof *run);
    if (guest_off >= img->virtual_size || max_len == 0)
        return fail(err, -EINVAL, "mapping guest offset 0x%llx outside the virtual size %llu",
                    HX(guest_off), HX(img->virtual_size));
    uint64_t end = guest_off + CDM_MIN(max_len, img->virtual_size - guest_off);
    uint64_t l1_index = guest_off >> img->l1_shift;
    end = CDM_MIN(end, (l1_index + 1) << img->l1_shift);

    pthread_mutex_lock(&c->lock);
    const uint8_t *p;
    uint64_t l1e_host = img->l1_off_host + l1_index * 8;
    int rc = cache_slice(c, CDM_ALIGN_DOWN(l1e_host, img->slice), &p, err);
    uint64_t l2_host = 0;
    if (rc == 0)
        rc = qcow2_decode_l1(img, l1_index, be64(p + (l1e_host & (img->slice - 1))), &l2_host,
                             err);
    if (rc < 0)
        goto out;
    if (l2_host == 0) {
        run->kind = QCOW2_UNALLOCATED;
        run->guest_off = guest_off;
        run->length = end - guest_off;
        goto out;
    }

    uint64_t per_slice = img->slice / img->entry_bytes;
    uint64_t l2_mask = (1ull << img->l2_bits) - 1;
    uint64_t first = ((guest_off >> img->cluster_bits) & l2_mask) / per_slice * per_slice;
    uint64_t slice_guest = (l1_index << img->l1_shift) + (first << img->cluster_bits);
    end = CDM_MIN(end, slice_guest + (per_slice << img->cluster_bits));
    rc = cache_slice(c, l2_host + first * img->entry_bytes, &p, err);
    if (rc < 0)
        goto out;

    uint64_t pos = guest_off;
    while (pos < end) {
        uint64_t idx = ((pos >> img->cluster_bits) & l2_mask) - first;
        const uint8_t *ep = p + idx * img->entry_bytes;
        uint64_t cg = CDM_ALIGN_DOWN(pos, img->cluster_size);
        uint64_t cend = CDM_MIN(cg + img->cluster_size, end);
        struct qcow2_entry d;
        rc = qcow2_decode_l2(img, l2_host, cg, be64(ep), img->extended_l2 ? be64(ep + 8) : 0,
                             &d, err);
        if (rc < 0)
            goto out;
        if (d.kind == QCOW2_COMPRESSED) {
            if (run->length == 0) {
                run->kind = QCOW2_COMPRESSED;
                run->guest_off = pos;
                run->length = cend - pos;
                run->host_off = d.host;
                run->csize = d.csize;
                run->cluster_guest = cg;
            }
            break;
        }
        rc = extend_standard(img, l2_host, cg, cend, &d, &pos, run, err);
        if (rc < 0)
            goto out;
        if (rc == 1) {
            rc = 0;
            break;
        }
    }
out:
    pthread_mutex_unlock(&c->lock);
    if (rc == 0 && run->length == 0)
        rc = fail(err, -EIO, "internal error: empty run at guest offset 0x%llx", HX(guest_off));
    return rc;
}

/* ---- decompression ---------------------------------------------------------------------- */

/* Set up the decoder pool P (decoders are created on first use). */
void qcow2_decoders_init(struct qcow2_decoders *p)
{
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->lock, NULL);
}

/* Free every decoder of P. */
void qcow2_decoders_fini(struct qcow2_decoders *p)
{
    for (unsigned i = 0; i < CDM_MAX_THREADS + 1; i++) {
        struct qcow2_decoder *d = &p->dec[i];
#ifdef CDM_HAVE_LIBDEFLATE
        if (d->deflate != NULL)
            libdeflate_free_decompressor(d->deflate);
#else
        if (d->zstream != NULL) {
            inflateEnd(d->zstream);
            free(d->zstream);
        }
#endif
#ifdef CDM_HAVE_ZSTD
        if (d->zstd != NULL)
            ZSTD_freeDCtx(d->zstd);
#endif
        memset(d, 0, sizeof *d);
    }
    pthread_mutex_destroy(&p->lock);
}

/* A free decoder of P for the calling thread, or NULL when all are busy (more users than
 * CDM_MAX_THREADS + 1).  Give it back with qcow2_decoder_put. */
struct qcow2_decoder *qcow2_decoder_get(struct qcow2_decoders *p)
{
    struct qcow2_decoder *d = NULL;
    pthread_mutex_lock(&p->lock);
    for (unsigned i = 0; i < CDM_MAX_THREADS + 1; i++) {
        if (!p->busy[i]) {
            p->busy[i] = true;
            d = &p->dec[i];
            break;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return d;
}

/* Return decoder D (from qcow2_decoder_get) to P. */
void qcow2_decoder_put(struct qcow2_decoders *p, struct qcow2_decoder *d)
{
    pthread_mutex_lock(&p->lock);
    p->busy[d - p->dec] = false;
    pthread_mutex_unlock(&p->lock);
}

static int inflate_raw(struct qcow2_decoder *d, const uint8_t *in, size_t in_len, uint8_t *out,
                       size_t out_len, uint64_t cluster_guest, size_t *in_used,
                       struct cdm_error *err)
{
#ifdef CDM_HAVE_LIBDEFLATE
    if (d->deflate == NULL) {
        d->deflate = libdeflate_alloc_decompressor();
        if (d->deflate == NULL)
            return fail(err, -ENOMEM, "cannot allocate a deflate decompressor");
    }
    size_t used = 0;
    enum libdeflate_result r =
        libdeflate_deflate_decompress_ex(d->deflate, in, in_len, out, out_len, &used, NULL);
    if (r == LIBDEFLATE_SUCCESS) {
        *in_used = used;
        return 0;
    }
    const char *why = r == LIBDEFLATE_SHORT_OUTPUT         ? "decompresses to less than a cluster"
                      : r == LIBDEFLATE_INSUFFICIENT_SPACE ? "decompresses to more than a cluster"
                                                           : "is not valid deflate data";
    return fail(err, -CDM_EFORMAT, "compressed cluster at guest offset 0x%llx %s",
                HX(cluster_guest), why);
#else
    /* Window bits -15: raw deflate with any window, which decodes qemu's 4 KiB-window
     * streams (-12) identically and accepts what libdeflate accepts, so both builds agree. */
    z_stream *z = d->zstream;
    if (z == NULL) {
        z = calloc(1, sizeof *z);
        if (z == NULL || inflateInit2(z, -15) != Z_OK) {
            free(z);
            return fail(err, -ENOMEM, "cannot allocate a deflate decompressor");
        }
        d->zstream = z;
    } else if (inflateReset(z) != Z_OK) {
        return fail(err, -EIO, "cannot reset the deflate decompressor");
    }
    z->next_in = (Bytef *)(uintptr_t)in;
    z->avail_in = (uInt)in_len;
    z->next_out = out;
    z->avail_out = (uInt)out_len;
    int zr = inflate(z, Z_FINISH);
    if (zr == Z_STREAM_END && z->avail_out == 0) {
        *in_used = in_len - z->avail_in;
        return 0;
    }
    const char *why = zr == Z_STREAM_END   ? "decompresses to less than a cluster"
                      : z->avail_out == 0  ? "decompresses to more than a cluster"
                      : zr == Z_BUF_ERROR ? "is truncated"
                                          : "is not valid deflate data";
    return fail(err, -CDM_EFORMAT, "compressed cluster at guest offset 0x%llx %s",
                HX(cluster_guest), why);
#endif
}

#ifdef CDM_HAVE_ZSTD
static int unzstd(struct qcow2_decoder *d, const uint8_t *in, size_t in_len, uint8_t *out,
                  size_t out_len, uint64_t cluster_guest, size_t *in_used, struct cdm_error *err)
{
    if (d->zstd == NULL) {
        d->zstd = ZSTD_createDCtx();
        if (d->zstd == NULL)
            return fail(err, -ENOMEM, "cannot allocate a zstd decompressor");
    }
    /* Like qemu, accept one or more frames that together make exactly one cluster; the
     * bytes after them are padding.  One-shot decoding into OUT allocates no window, and a
     * frame that would overflow the cluster fails instead of growing anything. */
    size_t in_pos = 0, out_pos = 0;
    while (out_pos < out_len) {
        if (in_pos >= in_len)
            return fail(err, -CDM_EFORMAT,
                        "compressed cluster at guest offset 0x%llx decompresses to less than "
                        "a cluster",
                        HX(cluster_guest));
        size_t fsz = ZSTD_findFrameCompressedSize(in + in_pos, in_len - in_pos);
        if (ZSTD_isError(fsz) || fsz == 0)
            return fail(err, -CDM_EFORMAT,
                        "compressed cluster at guest offset 0x%llx is not valid zstd data (%s)",
                        HX(cluster_guest), ZSTD_isError(fsz) ? ZSTD_getErrorName(fsz) : "empty");
        size_t n = ZSTD_decompressDCtx(d->zstd, out + out_pos, out_len - out_pos, in + in_pos,
                                       fsz);
        if (ZSTD_isError(n))
            return fail(err, -CDM_EFORMAT,
                        "compressed cluster at guest offset 0x%llx is not valid zstd data (%s)",
                        HX(cluster_guest), ZSTD_getErrorName(n));
        in_pos += fsz;
        out_pos += n;
    }
    *in_used = in_pos;
    return 0;
}
#endif

/* Decompress the IN_LEN compressed bytes at IN of the cluster at CLUSTER_GUEST into exactly
 * OUT_LEN (the cluster size) bytes at OUT with decoder D, using IMG's compression type.
 * Output longer or shorter than one cluster is an error.  IN_USED (may be NULL) receives the
 * bytes of IN the compressed data took; the rest is padding.  0, -ENOMEM, -CDM_EFORMAT or
 * -CDM_EUNSUPPORTED, with the message in ERR. */
int qcow2_decompress(const struct qcow2_image *img, struct qcow2_decoder *d, const uint8_t *in,
                     size_t in_len, uint8_t *out, size_t out_len, uint64_t cluster_guest,
                     size_t *in_used, struct cdm_error *err)
{
    size_t ignored;
    if (in_used == NULL)
        in_used = &ignored;
    switch (img->info.compression_type) {
    case CDM_QCOW2_COMPRESSION_ZLIB:
        return inflate_raw(d, in, in_len, out, out_len, cluster_guest, in_used, err);
#ifdef CDM_HAVE_ZSTD
    case CDM_QCOW2_COMPRESSION_ZSTD:
        return unzstd(d, in, in_len, out, out_len, cluster_guest, in_used, err);
#endif
    default:
        return fail(err, -CDM_EUNSUPPORTED,
                    "compression type %u is not supported by this build",
                    img->info.compression_type);
    }
}

/* ---- public inspection ------------------------------------------------------------------ */

/* Validate the QCOW2 header of FD and fill OUT with what it says.  Backing files, external
 * data files, encryption and the dirty and corrupt bits are reported, not refused.
 * 0, -errno, -CDM_EFORMAT or -CDM_EUNSUPPORTED; the message is in CTX. */
int cdm_qcow2_inspect(cdm_ctx *ctx, int fd, struct cdm_qcow2_info *out)
{
    struct cdm_file_reader fr;
    cdm_clear_error(ctx);
    int rc = cdm_file_reader_init(&fr, fd, -1, -1, 0, &ctx->error);
    if (rc < 0)
        return rc;
    return cdm_qcow2_inspect_reader(ctx, &fr.r, out);
}

/* cdm_qcow2_inspect of any reader. */
int cdm_qcow2_inspect_reader(cdm_ctx *ctx, struct cdm_reader *src, struct cdm_qcow2_info *out)
{
    struct qcow2_image *img = malloc(sizeof *img);
    if (img == NULL)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -ENOMEM, "out of memory");
    int rc = qcow2_open(img, src, &ctx->error);
    if (rc == 0)
        *out = img->info;
    free(img);
    return rc;
}
