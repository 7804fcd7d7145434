/* http.c -- an HTTP(S) source on libcurl (loaded on first use: curlapi.c).
 *
 * Opening sends one GET for the first bytes with a Range header: a 206 answer with a
 * Content-Range gives the size and shows that ranges are served; a 200 answer gives the
 * size only when it has a Content-Length (its body is cut off after the first bytes).  The
 * answer's ETag and Last-Modified are kept: every later answer must carry the same ones, or
 * the file changed under us (-CDM_ECHANGED).  Redirects are followed (bounded, http and
 * https only) and later requests go straight to the final URL; credentials and extra headers
 * go only to the origin they were given for.
 *
 * Random access (the reader): each read is one range request on an easy handle taken from a
 * small pool, so every worker has a connection of its own that stays open between requests.
 * The answer must be 206 with exactly the range asked for and no more bytes than that.
 * Streams: one GET of the whole file (or of its rest) whose body is pushed, in the calling
 * thread, into a pipeline of decoders.
 *
 * Failures: a dropped connection, a short body, a 5xx or 429 answer or a connection refused
 * is retried (bounded, with a doubling pause) from the last byte received.  Less than 1 KiB/s
 * for the idle timeout aborts the request (curl's low-speed limit), and so does a cancelled
 * context.  401/403/404 and every other status, TLS failures and protocol violations are
 * not retried: each has a message of its own.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "curlapi.h"
#include "internal.h"
#include "stream.h"

#define ULL(v) ((unsigned long long)(v))
#define HEAD_BYTES (64u << 10)          /* first bytes fetched by the open */
#define MAX_HEADER_BYTES (64u << 10)    /* response headers, all lines of one answer */
#define MAX_RETRY_DELAY_MS 10000u
#define LOW_SPEED_BYTES 1024L           /* below this many bytes per second is "idle" */
#define CURL_BUFFER (512L << 10)
#define MAX_CONNS (CDM_MAX_THREADS + 2)

struct conn {
    CURL *easy;
    bool busy;
};

struct http_source {
    struct cdm_source base;
    struct cdm_reader r;
    char *url;              /* final URL after the open's redirects */
    char shown[1024];       /* URL without query or fragment, for messages (a signed URL's */
                            /* query is a secret) */
    char *user;
    char *password;
    bool creds;             /* send USER/PASSWORD and HEADERS (same origin as given) */
    struct curl_slist *headers;
    cdm_reauth_fn reauth;   /* new credentials after a 401 of a stream's request */
    void *reauth_opaque;
    char *ca_pem;
    char *proxy_ca_pem;
    char *user_agent;
    uint32_t flags;
    uint32_t max_redirects;
    uint32_t retries;
    uint32_t retry_delay_ms;
    uint32_t idle_timeout;
    uint32_t connect_timeout;
    /* what the open learnt */
    bool size_known;
    bool ranges;
    uint64_t size;
    char etag[256];
    char last_modified[64];
    char content_type[128];
    _Atomic int http_version;
    _Atomic int status;     /* of the last failed request, else of the first */
    uint8_t *head;          /* the first HEAD_LEN bytes of the file */
    size_t head_len;
    /* shared by the workers */
    pthread_mutex_t lock;
    struct conn conns[MAX_CONNS];
    _Atomic uint64_t fetched;
    _Atomic uint64_t requests;
    _Atomic uint32_t retried;
    _Atomic uint32_t restarts;
    _Atomic(cdm_ctx *) ctx;     /* the operation running, for cancellation */
};

/* One request and what its answer said. */
struct xfer {
    struct http_source *h;
    CURL *easy;
    bool probe;             /* the open: a 200 answer is accepted, its body cut short */
    uint8_t *buf;           /* where the body goes: a buffer (reads), or */
    struct feeder *pipe;    /* a stream's decoding thread */
    uint64_t taken;         /* body bytes taken by every attempt (BUF is filled this far) */
    uint64_t reported;      /* TAKEN at the last progress report */
    /* the current request */
    uint64_t start;         /* first byte asked for */
    uint64_t want;          /* bytes wanted, or UINT64_MAX: to the end */
    bool ranged;            /* a Range header was sent */
    uint64_t got;           /* body bytes of this answer taken */
    /* the current answer (reset at each status line: redirects, 100 Continue) */
    long status;
    bool have_range;
    uint64_t cr_start, cr_end, cr_total;
    bool have_length;
    uint64_t length;
    char etag[256];
    char last_modified[64];
    char content_type[128];
    size_t header_bytes;
    bool checked;           /* the answer was checked when its body began */
    bool cut;               /* the probe stopped the body on purpose */
    char *redirect;         /* the probe: where a 3xx answer points (malloc'ed) */
    struct cdm_error err;   /* a failure found by a callback: never retried */
};

static bool ci_prefix(const char *line, size_t n, const char *name, const char **value)
{
    size_t k = strlen(name);
    if (n < k || strncasecmp(line, name, k) != 0)
        return false;
    const char *v = line + k;
    while (v < line + n && (*v == ' ' || *v == '\t'))
        v++;
    *value = v;
    return true;
}

/* Copy the header value V (up to the line's end LIM, without CR/LF) into OUT. */
static void copy_value(char *out, size_t cap, const char *v, const char *lim)
{
    size_t n = 0;
    while (v + n < lim && v[n] != '\r' && v[n] != '\n')
        n++;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

static bool parse_u64(const char **p, const char *lim, uint64_t *out)
{
    const char *s = *p;
    uint64_t v = 0;
    if (s >= lim || *s < '0' || *s > '9')
        return false;
    while (s < lim && *s >= '0' && *s <= '9') {
        if (v > (UINT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
        s++;
    }
    *p = s;
    *out = v;
    return true;
}

static size_t on_header(char *line, size_t size, size_t nitems, void *opaque)
{
    struct xfer *x = opaque;
    size_t n = size * nitems;
    const char *lim = line + n, *v;
    if (n >= 5 && strncmp(line, "HTTP/", 5) == 0) {     /* a new answer */
        x->have_range = x->have_length = false;
        x->etag[0] = x->last_modified[0] = x->content_type[0] = '\0';
        x->header_bytes = 0;
    }
    x->header_bytes += n;
    if (x->header_bytes > MAX_HEADER_BYTES) {
        cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                      "the server's response headers exceed %u KiB", MAX_HEADER_BYTES >> 10);
        return 0;
    }
    if (ci_prefix(line, n, "content-range:", &v)) {
        /* bytes FIRST-LAST/TOTAL */
        if (lim - v > 6 && strncasecmp(v, "bytes ", 6) == 0) {
            v += 6;
            uint64_t a, b, t;
            if (parse_u64(&v, lim, &a) && v < lim && *v++ == '-' && parse_u64(&v, lim, &b) &&
                v < lim && *v++ == '/' && parse_u64(&v, lim, &t) && a <= b && b < t) {
                x->have_range = true;
                x->cr_start = a;
                x->cr_end = b;
                x->cr_total = t;
            }
        }
    } else if (ci_prefix(line, n, "content-length:", &v)) {
        uint64_t len;
        if (parse_u64(&v, lim, &len)) {
            x->have_length = true;
            x->length = len;
        }
    } else if (ci_prefix(line, n, "etag:", &v)) {
        copy_value(x->etag, sizeof x->etag, v, lim);
    } else if (ci_prefix(line, n, "last-modified:", &v)) {
        copy_value(x->last_modified, sizeof x->last_modified, v, lim);
    } else if (ci_prefix(line, n, "content-type:", &v)) {
        copy_value(x->content_type, sizeof x->content_type, v, lim);
    }
    return n;
}

/* The answer's body begins: check that it is the one asked for.  0 (take the body), 1 (an
 * error status: leave the body) or -CDM_E* (in X->err). */
static int check_answer(struct xfer *x)
{
    struct http_source *h = x->h;
    long status = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    x->status = status;
    x->checked = true;
    if (status < 200 || status >= 300)
        return 1;
    if (!x->probe) {
        if (h->etag[0] && x->etag[0] && strcmp(h->etag, x->etag) != 0)
            return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_ECHANGED,
                                 "the file changed on the server during the transfer (ETag %s "
                                 "became %s)", h->etag, x->etag);
        if (h->last_modified[0] && x->last_modified[0] &&
            strcmp(h->last_modified, x->last_modified) != 0)
            return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_ECHANGED,
                                 "the file changed on the server during the transfer "
                                 "(Last-Modified %s became %s)", h->last_modified,
                                 x->last_modified);
    }
    if (!x->ranged)
        return 0;
    if (status != 206) {
        if (x->probe)
            return 0;
        return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                             "asked for bytes from offset %llu, the server answered %ld with "
                             "the whole file (it does not serve ranges now)", ULL(x->start),
                             status);
    }
    if (!x->have_range)
        return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                             "the server answered 206 without a usable Content-Range");
    if (!x->probe && h->size_known && x->cr_total != h->size)
        return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_ECHANGED,
                             "the file changed on the server during the transfer (its size was "
                             "%llu bytes, now %llu)", ULL(h->size), ULL(x->cr_total));
    uint64_t last = x->cr_total - 1;
    if (x->want != UINT64_MAX && x->want - 1 < x->cr_total - 1 - x->start)
        last = x->start + x->want - 1;
    if (x->cr_start != x->start || x->cr_end != last)
        return cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                             "asked for bytes %llu-%llu, the server sent bytes %llu-%llu",
                             ULL(x->start), ULL(last), ULL(x->cr_start), ULL(x->cr_end));
    return 0;
}

/* ---- a stream's decoding thread --------------------------------------------------------- */

/* A stream's bytes go from the transfer (the calling thread, where curl and the progress and
 * reauth callbacks run) to a thread that decodes and writes them, through FEED_SLOTS buffers
 * of FEED_CHUNK bytes: receiving (and the server reading its disk) overlaps decoding and
 * writing instead of alternating with them. */
#define FEED_CHUNK (1u << 20)
#define FEED_SLOTS 8

struct feeder {
    struct cdm_pipeline *p;
    struct cdm_error err;       /* the decoding thread's failure (the pipeline's messages) */
    pthread_t thread;
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint8_t *slot[FEED_SLOTS];
    size_t len[FEED_SLOTS];
    unsigned head, count;       /* the next slot to decode; slots handed over */
    bool done;                  /* no more bytes (or: stop, when ABANDON) */
    bool abandon;
    int rc;                     /* the decoding thread's result */
};

static void *feeder_main(void *opaque)
{
    struct feeder *f = opaque;
    pthread_mutex_lock(&f->lock);
    for (;;) {
        while (f->count == 0 && !f->done && !f->abandon)
            pthread_cond_wait(&f->cond, &f->lock);
        if (f->abandon || f->count == 0)
            break;
        unsigned i = f->head;
        pthread_mutex_unlock(&f->lock);
        int rc = cdm_pipeline_push(f->p, f->slot[i], f->len[i]);
        pthread_mutex_lock(&f->lock);
        f->len[i] = 0;
        f->head = (f->head + 1) % FEED_SLOTS;
        f->count--;
        if (rc < 0)
            f->rc = rc;
        pthread_cond_broadcast(&f->cond);
        if (rc < 0)
            break;
    }
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

/* Start F: a pipeline for OPTS onto W and its thread.  0 or an error (message in F->err). */
static int feeder_start(struct feeder *f, cdm_writer *w, const struct cdm_stream_opts *opts)
{
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);
    int rc = cdm_pipeline_new(w, opts, &f->err, &f->p);
    for (unsigned i = 0; rc == 0 && i < FEED_SLOTS; i++)
        if ((f->slot[i] = malloc(FEED_CHUNK)) == NULL)
            rc = cdm_error_set(&f->err, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    if (rc == 0) {
        int e = pthread_create(&f->thread, NULL, feeder_main, f);
        if (e != 0)
            rc = cdm_error_set(&f->err, CDM_SIDE_NONE, -e, "cannot start a thread: %s",
                               strerror(e));
        f->started = e == 0;
    }
    return rc;
}

/* Hand LEN bytes of DATA to F's thread, waiting for a free slot.  0, or the decoding
 * thread's failure. */
static int feeder_put(struct feeder *f, const uint8_t *data, size_t len)
{
    pthread_mutex_lock(&f->lock);
    while (len > 0 && f->rc == 0) {
        unsigned fill = (f->head + f->count) % FEED_SLOTS;
        if (f->count == FEED_SLOTS) {
            pthread_cond_wait(&f->cond, &f->lock);
            continue;
        }
        /* the slot being filled is the one after the last handed over; it is handed over
         * when full (below) or at the end (feeder_stop) */
        size_t n = CDM_MIN(len, FEED_CHUNK - f->len[fill]);
        memcpy(f->slot[fill] + f->len[fill], data, n);
        f->len[fill] += n;
        data += n;
        len -= n;
        if (f->len[fill] == FEED_CHUNK) {
            f->count++;
            pthread_cond_broadcast(&f->cond);
        }
    }
    int rc = f->rc;
    pthread_mutex_unlock(&f->lock);
    return rc;
}

/* No more bytes: hand over the last partial slot and wait for F's thread to decode what it
 * has (ABANDON: to stop at once instead).  The decoding thread's result. */
static int feeder_stop(struct feeder *f, bool abandon)
{
    if (!f->started)
        return f->err.rc;
    pthread_mutex_lock(&f->lock);
    unsigned fill = (f->head + f->count) % FEED_SLOTS;
    if (!abandon && f->count < FEED_SLOTS && f->len[fill] > 0)
        f->count++;
    f->done = true;
    f->abandon = abandon;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    pthread_join(f->thread, NULL);
    f->started = false;
    return f->rc;
}

static void feeder_free(struct feeder *f)
{
    feeder_stop(f, true);
    cdm_pipeline_free(f->p);
    for (unsigned i = 0; i < FEED_SLOTS; i++)
        free(f->slot[i]);
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->lock);
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *opaque)
{
    struct xfer *x = opaque;
    size_t n = size * nmemb;
    if (!x->checked) {
        int rc = check_answer(x);
        if (rc < 0)
            return 0;
    }
    if (x->status < 200 || x->status >= 300)
        return n;           /* an error page: dropped */
    atomic_fetch_add(&x->h->fetched, n);
    size_t take = n;
    if (x->want != UINT64_MAX && take > x->want - x->got) {
        if (!x->probe) {
            cdm_error_set(&x->err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                          "the server sent more than the %llu bytes asked for at offset %llu",
                          ULL(x->want), ULL(x->start));
            return 0;
        }
        take = (size_t)(x->want - x->got);
    }
    if (x->buf != NULL) {
        memcpy(x->buf + x->taken, data, take);
    } else if (x->pipe != NULL && take > 0) {
        int rc = feeder_put(x->pipe, (const uint8_t *)data, take);
        if (rc < 0) {
            if (x->err.rc == 0)
                cdm_error_set(&x->err, CDM_SIDE_NONE, rc, "%s", strerror(rc > -1000 ? -rc : EIO));
            x->err.rc = rc;
            return 0;
        }
    }
    x->got += take;
    x->taken += take;
    if (x->probe && x->got == x->want && (take < n || !x->ranged || x->status != 206)) {
        x->cut = true;      /* the open has what it needs: the rest of a 200 is not read */
        return 0;
    }
    return n;
}

#define PROGRESS_STEP (4u << 20)

/* Cancellation, and a stream's progress (it runs in the thread that started the operation,
 * as the progress callback requires). */
static int on_progress(void *opaque, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
    (void)dt; (void)dn; (void)ut; (void)un;
    struct xfer *x = opaque;
    cdm_ctx *ctx = atomic_load(&x->h->ctx);
    if (ctx == NULL)
        return 0;
    if (atomic_load(&ctx->cancel))
        return 1;
    if (x->pipe != NULL && ctx->progress != NULL && x->taken >= x->reported + PROGRESS_STEP) {
        x->reported = x->taken;
        if (ctx->progress(ctx->progress_opaque, x->taken, x->h->size_known ? x->h->size : 0)) {
            atomic_store(&ctx->cancel, 1);
            return 1;
        }
    }
    return 0;
}

/* ---- the connection pool ---------------------------------------------------------------- */

static CURL *conn_take(struct http_source *h)
{
    CURL *easy = NULL;
    pthread_mutex_lock(&h->lock);
    for (unsigned i = 0; i < MAX_CONNS; i++) {
        if (h->conns[i].busy)
            continue;
        if (h->conns[i].easy == NULL)
            h->conns[i].easy = curl_easy_init();
        if (h->conns[i].easy != NULL) {
            h->conns[i].busy = true;
            easy = h->conns[i].easy;
        }
        break;
    }
    pthread_mutex_unlock(&h->lock);
    return easy;
}

static void conn_give(struct http_source *h, CURL *easy)
{
    pthread_mutex_lock(&h->lock);
    for (unsigned i = 0; i < MAX_CONNS; i++)
        if (h->conns[i].easy == easy)
            h->conns[i].busy = false;
    pthread_mutex_unlock(&h->lock);
}

/* Options of every request on EASY (reset first: a handle keeps its connection). */
static void setup_easy(struct http_source *h, struct xfer *x, const char *url, char *errbuf,
                       const char *range)
{
    CURL *e = x->easy;
    curl_easy_reset(e);
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);    /* the open follows them itself */
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_USERAGENT, h->user_agent);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(e, CURLOPT_XFERINFODATA, x);
    curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, CURL_BUFFER);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, (long)h->connect_timeout);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, LOW_SPEED_BYTES);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (long)h->idle_timeout);
    if (h->flags & CDM_HTTP_INSECURE) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (h->ca_pem != NULL) {
        struct curl_blob blob = {h->ca_pem, strlen(h->ca_pem), CURL_BLOB_NOCOPY};
        curl_easy_setopt(e, CURLOPT_CAINFO_BLOB, &blob);
    }
    if (h->proxy_ca_pem != NULL) {
        struct curl_blob blob = {h->proxy_ca_pem, strlen(h->proxy_ca_pem), CURL_BLOB_NOCOPY};
        curl_easy_setopt(e, CURLOPT_PROXY_CAINFO_BLOB, &blob);
    }
    if (h->creds && h->user != NULL) {
        curl_easy_setopt(e, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
        curl_easy_setopt(e, CURLOPT_USERNAME, h->user);
        curl_easy_setopt(e, CURLOPT_PASSWORD, h->password != NULL ? h->password : "");
    }
    if (h->creds && h->headers != NULL)
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, h->headers);
    if (range != NULL)
        curl_easy_setopt(e, CURLOPT_RANGE, range);
}

static bool retryable(CURLcode cc, long status)
{
    switch (cc) {
    case CURLE_OK:
        return status >= 500 || status == 429;
    case CURLE_COULDNT_CONNECT:
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
        return true;
    default:
        return false;
    }
}

static const char *reason(long status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 407: return "Proxy Authentication Required";
    case 410: return "Gone";
    case 416: return "Range Not Satisfiable";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "";
    }
}

/* The failure of a finished request (CC, status) as a message in ERR.  Returns the code. */
static int failed(struct http_source *h, struct cdm_error *err, CURLcode cc, long status,
                  const char *errbuf, const char *url, unsigned attempts)
{
    char tries[64] = "";
    if (attempts > 1)
        snprintf(tries, sizeof tries, " (after %u attempts)", attempts);
    if (cc == CURLE_OK) {
        atomic_store(&h->status, (int)status);
        const char *hint = "";
        if (status == 401)
            hint = h->user != NULL ? ": wrong user name or password"
                                   : ": the server wants credentials";
        else if (status == 403)
            hint = ": access denied";
        else if (status == 404)
            hint = ": no such file on the server";
        else if (status == 407)
            hint = ": the proxy wants credentials";
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_EHTTP, "GET %s: HTTP %ld %s%s%s", url,
                             status, reason(status), hint, tries);
    }
    const char *detail = errbuf[0] ? errbuf : curl_easy_strerror(cc);
    switch (cc) {
    case CURLE_PEER_FAILED_VERIFICATION:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ETLS,
                             "GET %s: the server's certificate is not trusted (%s); give the "
                             "CA that signed it, or skip verification", url, detail);
    case CURLE_SSL_CACERT_BADFILE:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ETLS,
                             "GET %s: the CA bundle cannot be used (%s)", url, detail);
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_USE_SSL_FAILED:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ETLS, "GET %s: TLS failed (%s)%s", url,
                             detail, tries);
    case CURLE_OPERATION_TIMEDOUT:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ENETWORK,
                             "GET %s: no progress for %u seconds (%s)", url, h->idle_timeout,
                             detail);
    case CURLE_TOO_MANY_REDIRECTS:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                             "GET %s: more than %u redirects", url, h->max_redirects);
    case CURLE_UNSUPPORTED_PROTOCOL:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                             "GET %s: redirected to a protocol other than http or https (%s)",
                             url, detail);
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ENETWORK, "GET %s: unknown host (%s)",
                             url, detail);
    case CURLE_OUT_OF_MEMORY:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -ENOMEM, "GET %s: out of memory", url);
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_BAD_CONTENT_ENCODING:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_EPROTOCOL, "GET %s: %s", url, detail);
    default:
        return cdm_error_set(err, CDM_SIDE_SOURCE, -CDM_ENETWORK, "GET %s: %s%s", url, detail,
                             tries);
    }
}

static int cancelled(struct http_source *h)
{
    cdm_ctx *ctx = atomic_load(&h->ctx);
    return ctx != NULL && atomic_load(&ctx->cancel);
}

/* Sleep MS milliseconds in short steps, giving up early when the context is cancelled. */
static int pause_ms(struct http_source *h, uint32_t ms)
{
    while (ms > 0) {
        if (cancelled(h))
            return -CDM_ECANCELED;
        uint32_t step = CDM_MIN(ms, 50u);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
    return 0;
}

#define MAX_REAUTH 3            /* new credentials asked for per request */

/* Free the header list L, wiping the lines (they may hold credentials). */
static void free_headers(struct curl_slist *l)
{
    for (struct curl_slist *i = l; i != NULL; i = i->next)
        explicit_bzero(i->data, strlen(i->data));
    curl_slist_free_all(l);
}

/* A 401 answered a stream's request: ask H's reauth callback for a new header line and put
 * it in place of the one of the same name.  0: ask again; 1: keep the 401; -ENOMEM. */
static int reauthenticate(struct http_source *h)
{
    char line[8192];
    line[0] = '\0';
    if (h->reauth(h->reauth_opaque, line, sizeof line) != 0)
        return 1;
    line[sizeof line - 1] = '\0';
    const char *colon = strchr(line, ':');
    if (colon == NULL || colon == line || strpbrk(line, "\r\n") != NULL) {
        explicit_bzero(line, sizeof line);
        return 1;
    }
    size_t name = (size_t)(colon - line);
    struct curl_slist *fresh = NULL;
    int rc = 0;
    for (struct curl_slist *l = h->headers; l != NULL && rc == 0; l = l->next) {
        if (strncasecmp(l->data, line, name) == 0 && l->data[name] == ':')
            continue;       /* the old credentials */
        struct curl_slist *n = curl_slist_append(fresh, l->data);
        if (n == NULL)
            rc = -ENOMEM;
        else
            fresh = n;
    }
    if (rc == 0) {
        struct curl_slist *n = curl_slist_append(fresh, line);
        if (n == NULL)
            rc = -ENOMEM;
        else
            fresh = n;
    }
    explicit_bzero(line, sizeof line);
    if (rc < 0) {
        free_headers(fresh);
        return rc;
    }
    free_headers(h->headers);
    h->headers = fresh;
    return 0;
}

/* Fetch WANT bytes (or UINT64_MAX: to the end) from offset START through X (buf or pipe and
 * probe set by the caller) on a pooled connection, with retries: each retry asks for the rest
 * from the last byte taken.  A stream over a server without ranges cannot resume: -EAGAIN
 * then, and the caller starts over.  0 or error (message in ERR). */
static int transfer(struct http_source *h, struct xfer *x, uint64_t start, uint64_t want,
                    struct cdm_error *err)
{
    char errbuf[CURL_ERROR_SIZE];
    char range[64];
    unsigned attempts = 0, reauths = 0;
    uint32_t delay = h->retry_delay_ms;
    int rc;
    x->h = h;
    x->taken = 0;
    x->easy = conn_take(h);
    if (x->easy == NULL)
        return cdm_error_set(err, CDM_SIDE_SOURCE, -ENOMEM, "cannot set up an HTTP request");
    for (;;) {
        attempts++;
        errbuf[0] = '\0';
        x->checked = x->cut = false;
        x->status = 0;
        x->got = 0;
        cdm_error_clear(&x->err);
        x->start = start + x->taken;
        x->want = want == UINT64_MAX ? UINT64_MAX : want - x->taken;
        x->ranged = (h->ranges || x->probe) && !(x->start == 0 && x->want == UINT64_MAX);
        if (x->want == UINT64_MAX)
            snprintf(range, sizeof range, "%llu-", ULL(x->start));
        else
            snprintf(range, sizeof range, "%llu-%llu", ULL(x->start),
                     ULL(x->start + x->want - 1));
        setup_easy(h, x, h->url, errbuf, x->ranged ? range : NULL);
        atomic_fetch_add(&h->requests, 1);
        CURLcode cc = curl_easy_perform(x->easy);
        long status = x->status;
        if (status == 0)
            curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        x->status = status;
        if (x->err.rc != 0) {
            rc = cdm_error_take(err, &x->err);
            break;
        }
        if (cc == CURLE_ABORTED_BY_CALLBACK || cancelled(h)) {
            rc = cdm_error_set(err, CDM_SIDE_NONE, -CDM_ECANCELED, "cancelled");
            break;
        }
        if (cc == CURLE_WRITE_ERROR && x->cut) {
            rc = 0;
            break;
        }
        bool ok_status = status >= 200 && status < 300;
        if (cc == CURLE_OK && x->probe && status >= 300 && status < 400) {
            char *to = NULL;
            curl_easy_getinfo(x->easy, CURLINFO_REDIRECT_URL, &to);
            if (to != NULL) {
                x->redirect = strdup(to);
                rc = x->redirect != NULL ? 1 : cdm_error_set(err, CDM_SIDE_NONE, -ENOMEM,
                                                              "out of memory");
                break;
            }
        }
        if (cc == CURLE_OK && ok_status) {
            bool short_body = x->want != UINT64_MAX ? x->got < x->want
                              : h->size_known && !x->probe && x->start + x->got != h->size;
            if (!short_body || x->probe) {
                rc = 0;
                break;
            }
            cc = CURLE_PARTIAL_FILE;        /* the body ended early: resume */
        }
        if (cc == CURLE_OK && status == 401 && x->pipe != NULL && h->reauth != NULL &&
            h->creds && reauths < MAX_REAUTH) {
            /* (a stream runs in one thread: no other request uses the header list now) */
            reauths++;
            rc = reauthenticate(h);
            if (rc < 0) {
                rc = cdm_error_set(err, CDM_SIDE_NONE, rc, "out of memory");
                break;
            }
            if (rc == 0) {
                attempts--;     /* the same attempt, with new credentials */
                continue;
            }
        }
        if (!retryable(cc, status) || attempts > h->retries) {
            rc = failed(h, err, cc, status, errbuf, h->shown, attempts);
            break;
        }
        if (!h->ranges && x->taken > 0) {
            if (x->pipe != NULL) {
                rc = -EAGAIN;       /* a stream that cannot resume */
                break;
            }
            x->taken = 0;           /* the probe starts again */
        }
        atomic_fetch_add(&h->retried, 1);
        rc = pause_ms(h, delay);
        if (rc < 0) {
            cdm_error_set(err, CDM_SIDE_NONE, rc, "cancelled");
            break;
        }
        delay = CDM_MIN(delay * 2, MAX_RETRY_DELAY_MS);
    }
    if (rc == 0 && atomic_load(&h->http_version) == 0) {
        long v = 0;
        curl_easy_getinfo(x->easy, CURLINFO_HTTP_VERSION, &v);
        atomic_store(&h->http_version, v == CURL_HTTP_VERSION_2_0 ? 2 : 1);
    }
    conn_give(h, x->easy);
    return rc;
}

/* ---- the reader --------------------------------------------------------------------------- */

static int http_read(struct cdm_reader *r, void *buf, size_t len, uint64_t off, unsigned flags,
                     struct cdm_io *io)
{
    (void)flags;
    struct http_source *h = (struct http_source *)((char *)r - offsetof(struct http_source, r));
    if (len == 0)
        return 0;
    if (h->size_known && (off > h->size || len > h->size - off))
        return cdm_error_set(&io->error, CDM_SIDE_SOURCE, -EIO,
                             "read of %zu bytes at offset %llu passes the end of the file "
                             "(%llu bytes)", len, ULL(off), ULL(h->size));
    if (off < h->head_len && len <= h->head_len - off) {
        memcpy(buf, h->head + off, len);
    } else if (!h->ranges) {
        return cdm_error_set(&io->error, CDM_SIDE_SOURCE, -ESPIPE,
                             "the server does not serve byte ranges: bytes at offset %llu "
                             "can only be read in order", ULL(off));
    } else {
        struct xfer x;
        memset(&x, 0, sizeof x);
        x.buf = buf;
        int rc = transfer(h, &x, off, len, &io->error);
        if (rc < 0)
            return rc;
        if (x.taken < len)
            return cdm_error_set(&io->error, CDM_SIDE_SOURCE, -EIO,
                                 "the file ended at offset %llu while reading %zu bytes at "
                                 "offset %llu", ULL(off + x.taken), len, ULL(off));
    }
    io->stats.bytes_read += len;
    return 0;
}

static const struct cdm_reader_ops http_reader_ops = {
    .name = "http",
    .read = http_read,
    .next_data = NULL,
    .get_size = NULL,
    .close = NULL,
};

/* ---- the source --------------------------------------------------------------------------- */

static struct http_source *as_http(cdm_source *src)
{
    return (struct http_source *)src;
}

static struct cdm_reader *http_reader(cdm_source *src, bool random)
{
    struct http_source *h = as_http(src);
    return (h->ranges && h->size_known) || !random ? &h->r : NULL;
}

/* The decoding's failure (F's), when there is one, is the one to report: the transfer only
 * stopped because of it. */
static int stream_result(cdm_ctx *ctx, struct feeder *f, int rc)
{
    if (f->err.rc != 0) {
        cdm_error_clear(&ctx->error);
        return cdm_error_take(&ctx->error, &f->err);
    }
    return rc;
}

static int http_stream(cdm_source *src, cdm_ctx *ctx, cdm_writer *w,
                       const struct cdm_stream_opts *opts, struct cdm_stream_result *res)
{
    struct http_source *h = as_http(src);
    for (;;) {
        struct feeder f;
        int rc = feeder_start(&f, w, opts);
        if (rc < 0) {
            rc = stream_result(ctx, &f, rc);
            feeder_free(&f);
            return rc;
        }
        struct xfer x;
        memset(&x, 0, sizeof x);
        x.pipe = &f;
        /* with ranges, the first bytes the open fetched are not fetched again */
        uint64_t from = h->ranges ? h->head_len : 0;
        if (from > 0)
            rc = feeder_put(&f, h->head, (size_t)from);
        if (rc == 0 && !(h->size_known && from >= h->size))
            rc = transfer(h, &x, from, UINT64_MAX, &ctx->error);
        int decoded = feeder_stop(&f, rc < 0);
        if (rc == -EAGAIN) {
            feeder_free(&f);
            if (atomic_load(&h->restarts) >= h->retries)
                return cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_ENETWORK,
                                     "GET %s: the transfer broke %u times and the server does "
                                     "not serve ranges, so it cannot resume", h->shown,
                                     atomic_load(&h->restarts) + 1);
            atomic_fetch_add(&h->restarts, 1);
            continue;       /* from byte 0 again: the server cannot resume */
        }
        if (rc == 0)
            rc = decoded;
        if (rc == 0)
            rc = cdm_pipeline_end(f.p, res);
        rc = stream_result(ctx, &f, rc);
        feeder_free(&f);
        return rc;
    }
}

static void http_info(const cdm_source *src, struct cdm_source_info *out)
{
    const struct http_source *h = (const struct http_source *)src;
    memset(out, 0, sizeof *out);
    out->size = h->size;
    out->size_known = h->size_known;
    out->ranges = h->ranges;
    out->bytes_fetched = atomic_load(&h->fetched);
    out->requests = atomic_load(&h->requests);
    out->retries = atomic_load(&h->retried);
    out->restarts = atomic_load(&h->restarts);
    out->http_version = atomic_load(&h->http_version);
    out->status = atomic_load(&h->status);
    snprintf(out->etag, sizeof out->etag, "%s", h->etag);
    snprintf(out->last_modified, sizeof out->last_modified, "%s", h->last_modified);
    snprintf(out->content_type, sizeof out->content_type, "%s", h->content_type);
    snprintf(out->url, sizeof out->url, "%s", h->shown);
}

static void http_bind(cdm_source *src, cdm_ctx *ctx)
{
    atomic_store(&as_http(src)->ctx, ctx);
}

static void wipe_free(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

static void http_destroy(cdm_source *src)
{
    struct http_source *h = as_http(src);
    for (unsigned i = 0; i < MAX_CONNS; i++)
        if (h->conns[i].easy != NULL)
            curl_easy_cleanup(h->conns[i].easy);
    free_headers(h->headers);
    wipe_free(h->user);
    wipe_free(h->password);
    free(h->url);
    free(h->ca_pem);
    free(h->proxy_ca_pem);
    free(h->user_agent);
    free(h->head);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static const struct cdm_source_ops http_source_ops = {
    .reader = http_reader,
    .stream = http_stream,
    .info = http_info,
    .bind = http_bind,
    .destroy = http_destroy,
};

/* Scheme, host and port of URL into ORIGIN ("" when it cannot be parsed).  Whether URL holds
 * user information goes to *USERINFO. */
static void origin_of(const char *url, char *origin, size_t cap, bool *userinfo)
{
    origin[0] = '\0';
    *userinfo = false;
    CURLU *u = curl_url();
    if (u == NULL)
        return;
    char *scheme = NULL, *host = NULL, *port = NULL, *user = NULL;
    if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK)
        snprintf(origin, cap, "%s://%s:%s", scheme, host, port);
    if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
        *userinfo = true;
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(user);
    curl_url_cleanup(u);
}

static void set_shown(struct http_source *h)
{
    size_t n = strcspn(h->url, "?#");
    snprintf(h->shown, sizeof h->shown, "%.*s%s", (int)CDM_MIN(n, sizeof h->shown - 8),
             h->url, h->url[n] ? "?..." : "");
}

static int dup_opt(char **out, const char *s)
{
    *out = NULL;
    if (s == NULL)
        return 0;
    *out = strdup(s);
    return *out != NULL ? 0 : -ENOMEM;
}

/* Parse the "Name: value" lines of TEXT into H->headers.  0, -ENOMEM or -EINVAL. */
static int parse_headers(struct http_source *h, const char *text, struct cdm_error *err)
{
    const char *p = text;
    while (p != NULL && *p) {
        const char *nl = strchr(p, '\n');
        size_t n = nl != NULL ? (size_t)(nl - p) : strlen(p);
        while (n > 0 && (p[n - 1] == '\r' || p[n - 1] == ' '))
            n--;
        if (n > 0) {
            const char *colon = memchr(p, ':', n);
            if (colon == NULL || colon == p || n > 8192)
                return cdm_error_set(err, CDM_SIDE_NONE, -EINVAL,
                                     "an extra header is not of the form \"Name: value\"");
            char *line = strndup(p, n);
            if (line == NULL)
                return -ENOMEM;
            struct curl_slist *l = curl_slist_append(h->headers, line);
            explicit_bzero(line, n);
            free(line);
            if (l == NULL)
                return -ENOMEM;
            h->headers = l;
        }
        p = nl != NULL ? nl + 1 : NULL;
    }
    return 0;
}

int cdm_http_open(cdm_ctx *ctx, const struct cdm_http_opts *opts, cdm_source **out)
{
    cdm_clear_error(ctx);
    *out = NULL;
    if (opts->url == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -EINVAL, "no URL");
    int lrc = cdm_curl_load(&ctx->error);
    if (lrc < 0)
        return lrc;
    char origin[1024], here[1024];
    bool userinfo;
    origin_of(opts->url, origin, sizeof origin, &userinfo);
    if (origin[0] == '\0' ||
        (strncmp(origin, "http://", 7) != 0 && strncmp(origin, "https://", 8) != 0))
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EINVAL,
                             "not an http:// or https:// URL");
    if (userinfo)
        return cdm_set_error(ctx, CDM_SIDE_SOURCE, -EINVAL,
                             "the URL holds credentials: give them apart from it");
    struct http_source *h = calloc(1, sizeof *h);
    if (h == NULL)
        return cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    pthread_mutex_init(&h->lock, NULL);
    h->base.ops = &http_source_ops;
    h->r.ops = &http_reader_ops;
    h->r.align = 1;
    h->flags = opts->flags;
    h->max_redirects = opts->max_redirects ? opts->max_redirects : 10;
    h->retries = opts->retries;
    h->retry_delay_ms = opts->retry_delay_ms;
    h->idle_timeout = opts->idle_timeout ? opts->idle_timeout : 600;
    h->connect_timeout = opts->connect_timeout ? opts->connect_timeout : 30;
    h->creds = true;
    h->reauth = opts->reauth;
    h->reauth_opaque = opts->reauth_opaque;
    int rc = 0;
    if (dup_opt(&h->url, opts->url) < 0 || dup_opt(&h->user, opts->user) < 0 ||
        dup_opt(&h->password, opts->password) < 0 || dup_opt(&h->ca_pem, opts->ca_pem) < 0 ||
        dup_opt(&h->proxy_ca_pem, opts->proxy_ca_pem) < 0 ||
        dup_opt(&h->user_agent, opts->user_agent ? opts->user_agent : "cdimover") < 0 ||
        (h->head = malloc(HEAD_BYTES)) == NULL)
        rc = cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    if (rc == 0)
        set_shown(h);
    if (rc == 0 && opts->headers != NULL) {
        rc = parse_headers(h, opts->headers, &ctx->error);
        if (rc == -ENOMEM)
            rc = cdm_set_error(ctx, CDM_SIDE_NONE, -ENOMEM, "out of memory");
    }
    atomic_store(&h->ctx, ctx);
    struct xfer x;
    for (uint32_t hops = 0; rc == 0; hops++) {
        memset(&x, 0, sizeof x);
        x.probe = true;
        x.buf = h->head;
        rc = transfer(h, &x, 0, HEAD_BYTES, &ctx->error);
        if (rc != 1)
            break;
        /* a redirect: follow it, keeping the credentials to their origin */
        char *to = x.redirect;
        origin_of(to, here, sizeof here, &userinfo);
        if (hops >= h->max_redirects)
            rc = cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                               "GET %s: more than %u redirects", h->shown, h->max_redirects);
        else if (strncmp(here, "http://", 7) != 0 && strncmp(here, "https://", 8) != 0)
            rc = cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                               "GET %s: redirected to something other than an http or https "
                               "URL", h->shown);
        else if (userinfo)
            rc = cdm_set_error(ctx, CDM_SIDE_SOURCE, -CDM_EPROTOCOL,
                               "GET %s: redirected to a URL holding credentials", h->shown);
        if (rc == 1) {
            rc = 0;
            free(h->url);
            h->url = to;
            set_shown(h);
            to = NULL;
            h->creds = strcmp(here, origin) == 0;
        }
        free(to);
    }
    if (rc == 0) {
        h->head_len = (size_t)x.taken;
        atomic_store(&h->status, (int)x.status);
        h->ranges = x.status == 206 && !(h->flags & CDM_HTTP_NO_RANGES);
        if (x.status == 206) {
            h->size_known = true;
            h->size = x.cr_total;
        } else if (x.have_length) {
            h->size_known = true;
            h->size = x.length;
        } else if (!x.cut) {
            h->size_known = true;       /* the whole body fit in the first bytes */
            h->size = x.taken;
        }
        snprintf(h->etag, sizeof h->etag, "%s", x.etag);
        snprintf(h->last_modified, sizeof h->last_modified, "%s", x.last_modified);
        snprintf(h->content_type, sizeof h->content_type, "%s", x.content_type);
        /* a weak ETag may change with the representation, not the bytes: not compared */
        if (strncmp(h->etag, "W/", 2) == 0)
            h->etag[0] = '\0';
    }
    atomic_store(&h->ctx, NULL);
    if (rc < 0) {
        http_destroy(&h->base);
        return rc;
    }
    h->r.size = h->size;
    *out = &h->base;
    return 0;
}
