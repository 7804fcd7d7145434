/* test_tlscert.c -- cdm_self_signed_cert: PEM out, buffers never overrun, every refusal and
 * failure path frees what it made (LeakSanitizer runs with the tests). */
#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cdimover.h"

#define ROOM 4096

static int make(cdm_ctx *ctx, const char *cn, const char *san, uint32_t days, size_t cert_room,
                size_t key_room, char *cert, size_t *cert_len, char *key, size_t *key_len)
{
    memset(cert, 'x', ROOM + 1);
    memset(key, 'x', ROOM + 1);
    *cert_len = cert_room;
    *key_len = key_room;
    int rc = cdm_self_signed_cert(ctx, cn, san, days, cert, cert_len, key, key_len);
    assert(cert[cert_room] == 'x' && key[key_room] == 'x');     /* nothing past the room */
    return rc;
}

int main(void)
{
    cdm_ctx *ctx;
    assert(cdm_ctx_new(&ctx) == 0);
    static char cert[ROOM + 1], key[ROOM + 1];
    size_t cl, kl;

    assert(make(ctx, "cdimover-metrics", "DNS:localhost,IP:127.0.0.1,IP:::1", 365, ROOM, ROOM,
                cert, &cl, key, &kl) == 0);
    assert(cl > 400 && cl < ROOM && kl > 100 && kl < ROOM);
    assert(memcmp(cert, "-----BEGIN CERTIFICATE-----\n", 28) == 0);
    assert(memcmp(cert + cl - 26, "-----END CERTIFICATE-----\n", 26) == 0);
    assert(memcmp(key, "-----BEGIN PRIVATE KEY-----\n", 28) == 0);
    assert(memcmp(key + kl - 26, "-----END PRIVATE KEY-----\n", 26) == 0);
    assert(cdm_ctx_errmsg(ctx)[0] == '\0');

    /* A buffer too small for its PEM: -ENOSPC, nothing written past it. */
    assert(make(ctx, "n", "", 1, 200, ROOM, cert, &cl, key, &kl) == -ENOSPC);
    assert(strstr(cdm_ctx_errmsg(ctx), "does not fit") != NULL);
    assert(make(ctx, "n", "", 1, ROOM, 100, cert, &cl, key, &kl) == -ENOSPC);

    /* Refusals before anything is made, and OpenSSL refusing a name. */
    assert(make(ctx, "", "", 1, ROOM, ROOM, cert, &cl, key, &kl) == -EINVAL);
    assert(make(ctx, "n", "", 0, ROOM, ROOM, cert, &cl, key, &kl) == -EINVAL);
    assert(make(ctx, "n", "", 36501, ROOM, ROOM, cert, &cl, key, &kl) == -EINVAL);
    assert(make(ctx, "n", "IP:not-an-address", 1, ROOM, ROOM, cert, &cl, key, &kl) == -EIO);
    assert(strstr(cdm_ctx_errmsg(ctx), "cannot add the extensions") != NULL);
    assert(make(ctx, "n", "URI", 1, ROOM, ROOM, cert, &cl, key, &kl) == -EIO);

    /* A success after failures leaves no message behind. */
    assert(make(ctx, "n", "DNS:a", 1, ROOM, ROOM, cert, &cl, key, &kl) == 0);
    assert(cdm_ctx_errmsg(ctx)[0] == '\0');
    cdm_ctx_free(ctx);
    printf("test_tlscert: ok\n");
    return 0;
}
