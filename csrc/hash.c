/* hash.c -- digests of a stream (MD5, SHA-1, SHA-256, SHA-512) through OpenSSL's EVP
 * interface, fed as the bytes arrive.  CDM_HASH_NONE keeps no state and costs nothing.
 */
#include <errno.h>
#include <string.h>

#include <openssl/evp.h>

#include "stream.h"

static const EVP_MD *md_of(int algo, const char **name)
{
    switch (algo) {
    case CDM_HASH_MD5:
        *name = "md5";
        return EVP_md5();
    case CDM_HASH_SHA1:
        *name = "sha1";
        return EVP_sha1();
    case CDM_HASH_SHA256:
        *name = "sha256";
        return EVP_sha256();
    case CDM_HASH_SHA512:
        *name = "sha512";
        return EVP_sha512();
    default:
        *name = "?";
        return NULL;
    }
}

/* Start H for ALGO (CDM_HASH_*; CDM_HASH_NONE hashes nothing).  0, -EINVAL (unknown
 * algorithm), -ENOMEM or -CDM_EUNSUPPORTED (refused by OpenSSL, e.g. MD5 in FIPS mode);
 * message in ERR.  H needs cdm_hasher_fini afterwards in every case. */
int cdm_hasher_init(struct cdm_hasher *h, int algo, struct cdm_error *err)
{
    h->md_ctx = NULL;
    h->algo = algo;
    if (algo == CDM_HASH_NONE)
        return 0;
    const char *name;
    const EVP_MD *md = md_of(algo, &name);
    if (md == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL, "unknown hash algorithm %d", algo);
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (c == NULL)
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM, "out of memory for a %s digest", name);
    h->md_ctx = c;
    if (EVP_DigestInit_ex(c, md, NULL) != 1)
        return cdm_error_set(err, CDM_SIDE_NONE, -CDM_EUNSUPPORTED,
                             "OpenSSL refuses the %s digest (FIPS mode?)", name);
    return 0;
}

/* Add LEN bytes of BUF to H.  0 or -EIO (message in ERR). */
int cdm_hasher_update(struct cdm_hasher *h, const void *buf, size_t len, struct cdm_error *err)
{
    if (h->md_ctx == NULL || len == 0)
        return 0;
    if (EVP_DigestUpdate(h->md_ctx, buf, len) != 1)
        return cdm_error_set(err, CDM_SIDE_NONE, -EIO, "OpenSSL failed to update a digest");
    return 0;
}

/* Write H's digest to OUT (64 bytes of room) and its length to *LEN (0 when H hashes
 * nothing).  0 or -EIO (message in ERR). */
int cdm_hasher_final(struct cdm_hasher *h, uint8_t *out, uint32_t *len, struct cdm_error *err)
{
    *len = 0;
    if (h->md_ctx == NULL)
        return 0;
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(h->md_ctx, md, &n) != 1 || n > 64)
        return cdm_error_set(err, CDM_SIDE_NONE, -EIO, "OpenSSL failed to finish a digest");
    memcpy(out, md, n);
    *len = n;
    return 0;
}

/* Release what H holds (safe after a failed init, and twice). */
void cdm_hasher_fini(struct cdm_hasher *h)
{
    EVP_MD_CTX_free(h->md_ctx);
    h->md_ctx = NULL;
}
