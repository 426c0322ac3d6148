/* The daemon's REST API: the state its handlers share and the handlers themselves (routed by
 * server/routes.def). Handlers parse and validate on their HTTP thread, then call the registry
 * and the scheduler; no model math happens here. */
#ifndef LQ_API_H
#define LQ_API_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <time.h>

#include "server/files.h"
#include "server/http_server.h"
#include "server/jobs.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/scheduler.h"

struct lq_api_config {
    int context;            /* positions per sequence; 0: each model's maximum */
    double request_timeout; /* seconds a generation may run; 0: no limit */
    int max_choices;        /* prompts x n of one request, at most */
    char **model_roots;     /* directories POST /v1/models/load may read (real paths) */
    size_t n_model_roots;
    char *adapters_dir;  /* STATE_DIR/adapters (a real path): adapters load from the model
                            directories and from here; NULL: the model directories only */
    const char *version; /* for system_fingerprint */
};

struct lq_api {
    struct lq_registry *registry;   /* borrowed */
    struct lq_scheduler *scheduler; /* borrowed; see lq_api_close_scheduler */
    struct lq_metrics *metrics;     /* borrowed */
    struct lq_jobs *jobs;           /* borrowed; NULL: the job routes answer 503 */
    struct lq_files *files;         /* borrowed; NULL: the file routes answer 503 */
    struct lq_api_config config;
    /* Submissions hold it shared; lq_api_close_scheduler takes it exclusively, so no request
     * reaches a scheduler that is being freed. */
    pthread_rwlock_t scheduler_lock;
    int scheduler_closed;
    atomic_int draining; /* SIGTERM seen: refuse new work with 503 */
    time_t started;
};

/* Sets up api (fields above filled by the caller first). */
int lq_api_init(struct lq_api *api);
/* After this, generation requests get 503 and none is submitted; the caller may then free the
 * scheduler. */
void lq_api_close_scheduler(struct lq_api *api);
void lq_api_destroy(struct lq_api *api);

/* Handlers (void *app is the struct lq_api). */
void lq_api_health(void *app, struct lq_http_request *request);
void lq_api_ready(void *app, struct lq_http_request *request);
void lq_api_metrics(void *app, struct lq_http_request *request);
void lq_api_completions(void *app, struct lq_http_request *request);
void lq_api_chat_completions(void *app, struct lq_http_request *request);
void lq_api_models_list(void *app, struct lq_http_request *request);
void lq_api_models_get(void *app, struct lq_http_request *request);
void lq_api_models_allocation(void *app, struct lq_http_request *request);
void lq_api_models_load(void *app, struct lq_http_request *request);
void lq_api_models_unload(void *app, struct lq_http_request *request);
void lq_api_jobs_create(void *app, struct lq_http_request *request);
void lq_api_jobs_list(void *app, struct lq_http_request *request);
void lq_api_jobs_get(void *app, struct lq_http_request *request);
void lq_api_jobs_events(void *app, struct lq_http_request *request);
void lq_api_jobs_cancel(void *app, struct lq_http_request *request);
void lq_api_files_create(void *app, struct lq_http_request *request);
void lq_api_files_list(void *app, struct lq_http_request *request);
void lq_api_files_get(void *app, struct lq_http_request *request);
void lq_api_files_content(void *app, struct lq_http_request *request);
void lq_api_files_delete(void *app, struct lq_http_request *request);
void lq_api_adapters_list(void *app, struct lq_http_request *request);
void lq_api_adapters_load(void *app, struct lq_http_request *request);
void lq_api_adapters_unload(void *app, struct lq_http_request *request);

struct lq_api_error;
struct cJSON;
/* Resolves a path a client names to a real path inside one of roots (api_models.c): ".." and
 * links leading out are refused (403), a relative path is looked up under each root in turn
 * (404 when in none). 0, or -1 with e filled; real holds PATH_MAX bytes. */
int lq_api_confine(char *const *roots, size_t n_roots, const char *path, const char *param,
                   char *real, struct lq_api_error *e);
/* An adapter as GET /v1/adapters lists it (api_adapters.c). */
struct cJSON *lq_api_adapter_json(const struct lq_served_adapter *adapter);

#endif
