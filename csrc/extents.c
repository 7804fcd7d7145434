/* extents.c -- extent discovery with SEEK_DATA/SEEK_HOLE.  The map may come from the source
 * itself or from another file that mirrors it at an offset (a loop device's backing file):
 * guest offset G is map offset G + MAP_OFFSET.  ENXIO from SEEK_DATA means a hole to the end.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Find the data extent at or after guest offset POS in [0, END): *DATA_START and *DATA_END
 * receive it (both END when the rest is a hole).  0 or -errno. */
int cdm_next_data(int map_fd, uint64_t map_offset, uint64_t pos, uint64_t end,
                  uint64_t *data_start, uint64_t *data_end)
{
    off_t d = lseek(map_fd, (off_t)(pos + map_offset), SEEK_DATA);
    if (d < 0) {
        if (errno == ENXIO) {
            *data_start = *data_end = end;
            return 0;
        }
        return -errno;
    }
    uint64_t ds = (uint64_t)d < map_offset ? pos : (uint64_t)d - map_offset;
    if (ds < pos)
        ds = pos;
    if (ds >= end) {
        *data_start = *data_end = end;
        return 0;
    }
    off_t h = lseek(map_fd, (off_t)(ds + map_offset), SEEK_HOLE);
    if (h < 0) {
        if (errno != ENXIO)
            return -errno;
        h = (off_t)(end + map_offset);
    }
    uint64_t de = (uint64_t)h - map_offset;
    if (de > end || de <= ds)
        de = end;
    *data_start = ds;
    *data_end = de;
    return 0;
}

/* List the extents of guest range [OFFSET, OFFSET+LENGTH) of FD (guest offset G lives at FD
 * offset G + MAP_OFFSET) into OUT (capacity CAP), data and holes alternating, the last one
 * clipped to the range.  *N_OUT receives the count.  Returns 0 when the range was covered,
 * 1 when OUT filled up first (call again from the end of the last extent), or -errno. */
int cdm_scan_extents(cdm_ctx *ctx, int fd, uint64_t map_offset, uint64_t offset,
                     uint64_t length, struct cdm_extent *out, size_t cap, size_t *n_out)
{
    uint64_t end = offset + length;
    uint64_t pos = offset;
    size_t n = 0;
    cdm_clear_error(ctx);
    *n_out = 0;
    if (end < offset || map_offset + end < map_offset)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EINVAL, "range overflows");
    while (pos < end) {
        uint64_t ds, de;
        int rc = cdm_next_data(fd, map_offset, pos, end, &ds, &de);
        if (rc < 0)
            return cdm_set_error(ctx, CDM_SIDE_SOURCE, rc, "SEEK_DATA/SEEK_HOLE: %s",
                                 strerror(-rc));
        if (ds > pos) {
            if (n == cap)
                break;
            out[n++] = (struct cdm_extent){pos, ds - pos, CDM_EXTENT_HOLE};
        }
        if (de > ds) {
            if (n == cap)
                break;
            out[n++] = (struct cdm_extent){ds, de - ds, CDM_EXTENT_DATA};
        }
        pos = de;
    }
    *n_out = n;
    return pos < end ? 1 : 0;
}
