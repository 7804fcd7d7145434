/* curlapi.c -- libcurl, loaded when the first HTTP(S) source opens rather than with the
 * extension: a local copy, a conversion or a clone never maps libcurl and the twenty-odd
 * libraries it needs (TLS, HTTP/2, IDN, LDAP, Kerberos...), which would cost every such job
 * about 12 MiB of page cache charged to its memory cgroup and tens of milliseconds of
 * start-up from a cold disk.  The build still requires libcurl's headers and library (no
 * build leaves HTTP out); at run time a missing libcurl is a clear error of the open.
 *
 * The table of entry points is the one piece of process-wide state in the core: the dynamic
 * linker and curl_global_init are process-wide themselves.  It is filled once (pthread_once)
 * and never changes afterwards, so every thread may read it without a lock.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "curlapi.h"

#define LIBCURL_SONAME "libcurl.so.4"

struct cdm_curl_api cdm_curl;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[200];    /* empty when the table is usable */

#define SYM(field, name)                                                                     \
    do {                                                                                     \
        *(void **)&api.field = dlsym(h, name);                                               \
        if (api.field == NULL) {                                                             \
            snprintf(load_error, sizeof load_error, "%s lacks %s", LIBCURL_SONAME, name);    \
            return;                                                                          \
        }                                                                                    \
    } while (0)

static void load(void)
{
    struct cdm_curl_api api;
    memset(&api, 0, sizeof api);
    void *h = dlopen(LIBCURL_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "cannot load %s: %s", LIBCURL_SONAME,
                 why != NULL ? why : "unknown error");
        return;
    }
    SYM(global_init, "curl_global_init");
    SYM(easy_init, "curl_easy_init");
    SYM(easy_setopt, "curl_easy_setopt");
    SYM(easy_perform, "curl_easy_perform");
    SYM(easy_getinfo, "curl_easy_getinfo");
    SYM(easy_reset, "curl_easy_reset");
    SYM(easy_cleanup, "curl_easy_cleanup");
    SYM(easy_strerror, "curl_easy_strerror");
    SYM(free, "curl_free");
    SYM(slist_append, "curl_slist_append");
    SYM(slist_free_all, "curl_slist_free_all");
    SYM(url, "curl_url");
    SYM(url_cleanup, "curl_url_cleanup");
    SYM(url_get, "curl_url_get");
    SYM(url_set, "curl_url_set");
    if (api.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(load_error, sizeof load_error, "libcurl cannot start (curl_global_init)");
        return;
    }
    cdm_curl = api;     /* the library stays loaded for the life of the process */
}

/* Load libcurl once per process.  0, or -ENOSYS with the reason in ERR. */
int cdm_curl_load(struct cdm_error *err)
{
    pthread_once(&load_once, load);
    if (load_error[0] != '\0')
        return cdm_error_set(err, CDM_SIDE_NONE, -ENOSYS, "HTTP(S) sources need libcurl: %s",
                             load_error);
    return 0;
}
