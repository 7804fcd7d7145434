/* probe.c -- facts about an endpoint: size, sector sizes and identity of a file or block
 * device, and the backing file of a loop device.
 */
#include <errno.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Fill OUT with the facts of FD.  0 or -errno (message in CTX). */
int cdm_probe_fd(cdm_ctx *ctx, int fd, struct cdm_probe *out)
{
    struct stat st;
    cdm_clear_error(ctx);
    memset(out, 0, sizeof *out);
    if (fstat(fd, &st) < 0)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -errno, "fstat: %s", strerror(errno));
    out->dev = (uint64_t)st.st_dev;
    out->ino = (uint64_t)st.st_ino;
    out->rdev = (uint64_t)st.st_rdev;
    out->blocks = (uint64_t)st.st_blocks;
    out->fs_block = (uint32_t)st.st_blksize;
    if (S_ISBLK(st.st_mode)) {
        uint64_t size = 0;
        int lss = 0;
        unsigned int pbs = 0;
        out->is_blockdev = 1;
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            return cdm_set_error(ctx, CDM_SIDE_NONE, -errno, "BLKGETSIZE64: %s", strerror(errno));
        if (ioctl(fd, BLKSSZGET, &lss) < 0)
            return cdm_set_error(ctx, CDM_SIDE_NONE, -errno, "BLKSSZGET: %s", strerror(errno));
        if (ioctl(fd, BLKPBSZGET, &pbs) < 0)
            pbs = (unsigned int)lss;
        out->size = size;
        out->logical_sector = (uint32_t)lss;
        out->physical_sector = pbs;
    } else if (S_ISREG(st.st_mode)) {
        out->is_regular = 1;
        out->size = (uint64_t)st.st_size;
        out->logical_sector = 512;
        out->physical_sector = (uint32_t)st.st_blksize;
    } else {
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "not a regular file or a block device");
    }
    return 0;
}

/* Fill OUT with the loop status of block device FD (LOOP_GET_STATUS64).  0; -ENOTTY or
 * -EINVAL when FD is not a loop device; -ENXIO when nothing is attached. */
int cdm_loop_status(cdm_ctx *ctx, int fd, struct cdm_loop_status *out)
{
    struct loop_info64 info;
    cdm_clear_error(ctx);
    memset(out, 0, sizeof *out);
    memset(&info, 0, sizeof info);
    if (ioctl(fd, LOOP_GET_STATUS64, &info) < 0)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -errno, "LOOP_GET_STATUS64: %s",
                             strerror(errno));
    out->backing_dev = info.lo_device;
    out->backing_ino = info.lo_inode;
    out->offset = info.lo_offset;
    out->sizelimit = info.lo_sizelimit;
    out->flags = info.lo_flags;
    return 0;
}
