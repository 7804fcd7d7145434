/* tlscert.c -- a self-signed certificate and its key for a pod's metrics endpoint: EC P-256,
 * signed with SHA-256, both in PEM.  CDI's controllers scrape the pods' metrics over HTTPS
 * without verifying the certificate; the pod makes a new one at every start.  Made with
 * OpenSSL's libcrypto, which the core links for digests anyway, so a pod needs no other
 * cryptography library (and keeps none of its code in memory).
 */
#include <errno.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "internal.h"

#define MAX_DAYS 36500u
#define MAX_NAME 64u        /* an X.509 common name's upper bound (RFC 5280) */
#define MAX_SAN 1024u

/* Record OpenSSL's first queued error (or WHAT alone) on CTX as -EIO. */
static int ossl_fail(cdm_ctx *ctx, const char *what)
{
    unsigned long e = ERR_get_error();
    char detail[256] = "";
    if (e != 0)
        ERR_error_string_n(e, detail, sizeof detail);
    ERR_clear_error();
    return cdm_set_error(ctx, CDM_SIDE_NONE, -EIO, "self-signed certificate: %s%s%s", what,
                         detail[0] ? ": " : "", detail);
}

/* A new EC P-256 key, or NULL. */
static EVP_PKEY *new_p256_key(void)
{
    EVP_PKEY *pk = NULL;
    EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
    if (kc != NULL && EVP_PKEY_keygen_init(kc) == 1 &&
        EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kc, NID_X9_62_prime256v1) == 1 &&
        EVP_PKEY_keygen(kc, &pk) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(kc);
    return pk;
}

/* A random positive serial number of 16 bytes (RFC 5280: at most 20, not zero) into X. */
static int set_serial(X509 *x)
{
    unsigned char r[16];
    if (RAND_bytes(r, sizeof r) != 1)
        return 0;
    r[0] = (unsigned char)((r[0] & 0x7f) | 0x40);
    BIGNUM *bn = BN_bin2bn(r, sizeof r, NULL);
    int ok = bn != NULL && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
    BN_free(bn);
    return ok;
}

/* Add the extension NID with VALUE in OpenSSL's configuration syntax to X. */
static int add_ext(X509 *x, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    int ok = ext != NULL && X509_add_ext(x, ext, -1) == 1;
    X509_EXTENSION_free(ext);
    return ok;
}

/* Copy what BIO holds to OUT (room for *LEN bytes; *LEN set to the length).  0 or -ENOSPC. */
static int take_pem(BIO *bio, char *out, size_t *len)
{
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    if (n <= 0 || data == NULL)
        return -EIO;
    if ((size_t)n > *len)
        return -ENOSPC;
    memcpy(out, data, (size_t)n);
    *len = (size_t)n;
    return 0;
}

int cdm_self_signed_cert(cdm_ctx *ctx, const char *common_name, const char *subject_alt_names,
                         uint32_t days, char *cert, size_t *cert_len, char *key, size_t *key_len)
{
    cdm_clear_error(ctx);
    if (common_name == NULL || common_name[0] == '\0' || strlen(common_name) > MAX_NAME)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "self-signed certificate: a common name of 1 to %u bytes", MAX_NAME);
    if (subject_alt_names == NULL || strlen(subject_alt_names) > MAX_SAN)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "self-signed certificate: subject alternative names over %u bytes",
                             MAX_SAN);
    if (days == 0 || days > MAX_DAYS)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL,
                             "self-signed certificate: %u days of validity (1 to %u)", days,
                             MAX_DAYS);
    ERR_clear_error();
    int rc = 0;
    X509 *x = NULL;
    BIO *cb = NULL, *kb = NULL;
    EVP_PKEY *pk = new_p256_key();
    if (pk == NULL) {
        rc = ossl_fail(ctx, "cannot make an EC P-256 key");
        goto out;
    }
    time_t now = time(NULL);    /* one clock reading: the validity is exactly DAYS + 5 min */
    x = X509_new();
    X509_NAME *name = x != NULL ? X509_get_subject_name(x) : NULL;
    if (name == NULL || X509_set_version(x, 2) != 1 || !set_serial(x) ||
        X509_time_adj_ex(X509_getm_notBefore(x), 0, -300, &now) == NULL || /* clocks drift */
        X509_time_adj_ex(X509_getm_notAfter(x), (int)days, 0, &now) == NULL ||
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                   (const unsigned char *)common_name, -1, -1, 0) != 1 ||
        X509_set_issuer_name(x, name) != 1 || X509_set_pubkey(x, pk) != 1) {
        rc = ossl_fail(ctx, "cannot fill in the certificate");
        goto out;
    }
    if ((subject_alt_names[0] != '\0' &&
         !add_ext(x, NID_subject_alt_name, subject_alt_names)) ||
        !add_ext(x, NID_basic_constraints, "critical,CA:FALSE") ||
        !add_ext(x, NID_subject_key_identifier, "hash")) {
        rc = ossl_fail(ctx, "cannot add the extensions (subject alternative names as "
                            "DNS:name,IP:address)");
        goto out;
    }
    if (X509_sign(x, pk, EVP_sha256()) <= 0) {
        rc = ossl_fail(ctx, "cannot sign the certificate");
        goto out;
    }
    cb = BIO_new(BIO_s_mem());
    kb = BIO_new(BIO_s_mem());
    if (cb == NULL || kb == NULL || PEM_write_bio_X509(cb, x) != 1 ||
        PEM_write_bio_PrivateKey(kb, pk, NULL, NULL, 0, NULL, NULL) != 1) {
        rc = ossl_fail(ctx, "cannot write the PEM");
        goto out;
    }
    if ((rc = take_pem(cb, cert, cert_len)) < 0 || (rc = take_pem(kb, key, key_len)) < 0) {
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, rc, "self-signed certificate: %s",
                           rc == -ENOSPC ? "the PEM does not fit the buffer given"
                                         : "no PEM written");
        goto out;
    }
out:
    if (kb != NULL) {           /* the key's PEM: wiped before the memory is given back */
        char *data = NULL;
        long n = BIO_get_mem_data(kb, &data);
        if (n > 0 && data != NULL)
            OPENSSL_cleanse(data, (size_t)n);
    }
    BIO_free(cb);
    BIO_free(kb);
    X509_free(x);
    EVP_PKEY_free(pk);
    return rc;
}
