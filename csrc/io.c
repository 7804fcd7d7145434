/* io.c -- positional I/O that completes: retries EINTR and short transfers, and aligned
 * buffer allocation for O_DIRECT.
 */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* Read up to LEN bytes at OFF from FD into BUF, stopping early only at end of file.
 * *GOT receives the count.  0 or -errno. */
int cdm_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *got = done;
            return -errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

/* Write all LEN bytes of BUF at OFF to FD.  0 or -errno (-EIO if the write makes no
 * progress). */
int cdm_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const uint8_t *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return 0;
}

/* SIZE bytes aligned to CDM_ALIGN, or NULL; release with free(). */
void *cdm_alloc_aligned(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, CDM_ALIGN, CDM_ALIGN_UP(size ? size : 1, CDM_ALIGN)) != 0)
        return NULL;
    return p;
}
