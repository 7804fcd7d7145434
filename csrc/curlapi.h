/* curlapi.h -- libcurl's entry points, loaded on first use (curlapi.c).  Include it instead
 * of <curl/curl.h>: the curl_* names used by http.c become calls through the table, which
 * cdm_curl_load() fills before the first of them. */
#ifndef CDM_CURLAPI_H
#define CDM_CURLAPI_H

#define CURL_DISABLE_TYPECHECK  /* its macros would wrap the names redefined below */
#include <curl/curl.h>

#include "internal.h"

struct cdm_curl_api {
    CURLcode (*global_init)(long flags);
    CURL *(*easy_init)(void);
    CURLcode (*easy_setopt)(CURL *easy, CURLoption option, ...);
    CURLcode (*easy_perform)(CURL *easy);
    CURLcode (*easy_getinfo)(CURL *easy, CURLINFO info, ...);
    void (*easy_reset)(CURL *easy);
    void (*easy_cleanup)(CURL *easy);
    const char *(*easy_strerror)(CURLcode code);
    void (*free)(void *p);
    struct curl_slist *(*slist_append)(struct curl_slist *list, const char *data);
    void (*slist_free_all)(struct curl_slist *list);
    CURLU *(*url)(void);
    void (*url_cleanup)(CURLU *handle);
    CURLUcode (*url_get)(const CURLU *handle, CURLUPart what, char **part, unsigned int flags);
    CURLUcode (*url_set)(CURLU *handle, CURLUPart what, const char *part, unsigned int flags);
};

extern struct cdm_curl_api cdm_curl;

int cdm_curl_load(struct cdm_error *err);

#undef curl_easy_setopt     /* curl.h's argument-count guards */
#undef curl_easy_getinfo
#define curl_easy_init cdm_curl.easy_init
#define curl_easy_setopt cdm_curl.easy_setopt
#define curl_easy_perform cdm_curl.easy_perform
#define curl_easy_getinfo cdm_curl.easy_getinfo
#define curl_easy_reset cdm_curl.easy_reset
#define curl_easy_cleanup cdm_curl.easy_cleanup
#define curl_easy_strerror cdm_curl.easy_strerror
#define curl_free cdm_curl.free
#define curl_slist_append cdm_curl.slist_append
#define curl_slist_free_all cdm_curl.slist_free_all
#define curl_url cdm_curl.url
#define curl_url_cleanup cdm_curl.url_cleanup
#define curl_url_get cdm_curl.url_get
#define curl_url_set cdm_curl.url_set

#endif
