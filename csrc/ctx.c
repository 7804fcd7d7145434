/* ctx.c -- the context (progress callback, cancellation flag, the error of the last failed
 * operation) and the one error channel: a code, a side and a message recorded once, the first
 * failure winning.
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
    return ctx->error.msg;
}

/* Which endpoint CTX's last failure concerns: CDM_SIDE_*. */
int cdm_ctx_errside(const cdm_ctx *ctx)
{
    return ctx->error.side;
}

/* Format FMT with AP into BUF of CAP bytes (truncated, NUL-terminated).  Returns the length. */
int cdm_vformat_error(char *buf, size_t cap, const char *fmt, va_list ap)
{
    int n = vsnprintf(buf, cap, fmt, ap);
    return n < 0 ? 0 : n;
}

/* Record a failure with code RC (< 0) concerning SIDE in E unless E already holds one.
 * Returns the code E holds afterwards: the first failure's. */
int cdm_error_set(struct cdm_error *e, int side, int rc, const char *fmt, ...)
{
    if (e->rc == 0 && rc < 0) {
        va_list ap;
        va_start(ap, fmt);
        cdm_vformat_error(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        e->side = side;
        e->rc = rc;
    }
    return e->rc != 0 ? e->rc : rc;
}

/* Copy FROM's failure into INTO unless INTO already holds one.  Returns INTO's code. */
int cdm_error_take(struct cdm_error *into, const struct cdm_error *from)
{
    if (into->rc == 0 && from->rc < 0)
        *into = *from;
    return into->rc;
}

/* Forget E's failure. */
void cdm_error_clear(struct cdm_error *e)
{
    e->rc = 0;
    e->side = CDM_SIDE_NONE;
    e->msg[0] = '\0';
}

/* Record a failure on CTX (the first one of the operation wins); returns the code CTX holds,
 * so callers can `return cdm_set_error(...)`. */
int cdm_set_error(cdm_ctx *ctx, int side, int rc, const char *fmt, ...)
{
    if (ctx->error.rc == 0 && rc < 0) {
        va_list ap;
        va_start(ap, fmt);
        cdm_vformat_error(ctx->error.msg, sizeof ctx->error.msg, fmt, ap);
        va_end(ap);
        ctx->error.side = side;
        ctx->error.rc = rc;
    }
    return ctx->error.rc != 0 ? ctx->error.rc : rc;
}

/* Forget CTX's last failure; every public operation starts with this. */
void cdm_clear_error(cdm_ctx *ctx)
{
    cdm_error_clear(&ctx->error);
}

/* True for the errno values that mean "this operation is not supported here".  EINVAL is
 * not one of them: a caller for which EINVAL has a known harmless meaning (an alignment the
 * call refuses) says so at its call site. */
bool cdm_errno_unsupported(int err)
{
    return err == EOPNOTSUPP || err == ENOTSUP || err == ENOTTY || err == ENOSYS;
}
