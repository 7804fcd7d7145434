/* ctx.c -- the context: progress callback, cancellation flag and the error message of the
 * last failed operation.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Allocate a context into *OUT.  0 or -ENOMEM. */
int cdm_ctx_new(cdm_ctx **out)
{
    cdm_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL)
        return -ENOMEM;
    atomic_init(&ctx->cancel, 0);
    *out = ctx;
    return 0;
}

/* Free CTX (NULL is allowed). */
void cdm_ctx_free(cdm_ctx *ctx)
{
    free(ctx);
}

/* Install FN (with OPAQUE) as CTX's progress callback; FN NULL removes it. */
void cdm_ctx_set_progress(cdm_ctx *ctx, cdm_progress_fn fn, void *opaque)
{
    ctx->progress = fn;
    ctx->progress_opaque = opaque;
}

/* Ask the running operation of CTX to stop at its next request; safe from any thread.
 * The flag is cleared when the next operation starts. */
void cdm_ctx_cancel(cdm_ctx *ctx)
{
    atomic_store(&ctx->cancel, 1);
}

/* The message of CTX's last failure ("" if none); valid until the next call on CTX. */
const char *cdm_ctx_errmsg(const cdm_ctx *ctx)
{
    return ctx->errmsg;
}

/* Which endpoint CTX's last failure concerns: CDM_SIDE_*. */
int cdm_ctx_errside(const cdm_ctx *ctx)
{
    return ctx->errside;
}

int cdm_vformat_error(char *buf, size_t cap, const char *fmt, va_list ap)
{
    int n = vsnprintf(buf, cap, fmt, ap);
    return n < 0 ? 0 : n;
}

/* Record an error on CTX; returns RC so callers can `return cdm_set_error(...)`. */
int cdm_set_error(cdm_ctx *ctx, int side, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    cdm_vformat_error(ctx->errmsg, sizeof ctx->errmsg, fmt, ap);
    va_end(ap);
    ctx->errside = side;
    return rc;
}

void cdm_clear_error(cdm_ctx *ctx)
{
    ctx->errmsg[0] = '\0';
    ctx->errside = CDM_SIDE_NONE;
}

/* True for the errno values that mean "this operation is not supported here". */
bool cdm_errno_unsupported(int err)
{
    return err == EOPNOTSUPP || err == ENOTSUP || err == ENOTTY || err == ENOSYS ||
           err == EINVAL;
}
