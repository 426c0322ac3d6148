/* Operations: GET /health (liveness, no auth), GET /ready (a model is loaded and the daemon
 * is not draining), GET /metrics (Prometheus text); and the API's shared state. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"

int lq_api_init(struct lq_api *api) {
    api->scheduler_closed = 0;
    atomic_init(&api->draining, 0);
    api->started = time(NULL);
    return pthread_rwlock_init(&api->scheduler_lock, NULL) ? LQ_ENOMEM : LQ_OK;
}

void lq_api_close_scheduler(struct lq_api *api) {
    pthread_rwlock_wrlock(&api->scheduler_lock);
    api->scheduler_closed = 1;
    pthread_rwlock_unlock(&api->scheduler_lock);
}

void lq_api_destroy(struct lq_api *api) {
    pthread_rwlock_destroy(&api->scheduler_lock);
}

void lq_api_health(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "status", atomic_load(&api->draining) ? "draining" : "ok");
    cJSON_AddNumberToObject(root, "uptime_seconds", (double)(time(NULL) - api->started));
    lq_http_respond_json(request, 200, root);
    cJSON_Delete(root);
}

void lq_api_ready(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t count = 0;
    struct lq_served_model **models = lq_registry_list(api->registry, &count);
    int draining = atomic_load(&api->draining);
    cJSON *root = cJSON_CreateObject();
    const char *status = draining ? "draining" : count == 0 ? "no model loaded" : "ready";
    cJSON_AddStringToObject(root, "status", status);
    cJSON *names = cJSON_AddArrayToObject(root, "models");
    for (size_t i = 0; models && i < count; i++) {
        cJSON_AddItemToArray(names, cJSON_CreateString(models[i]->name));
        lq_served_model_release(models[i]);
    }
    free(models);
    lq_http_respond_json(request, !draining && count > 0 ? 200 : 503, root);
    cJSON_Delete(root);
}

_Static_assert(sizeof(((struct lq_metrics_gauges *)0)->jobs) == LQ_JOB_STATUS_COUNT * sizeof(int),
               "lq_metrics_gauges.jobs holds one count per job status");

void lq_api_metrics(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    struct lq_metrics_gauges gauges = {0};
    pthread_rwlock_rdlock(&api->scheduler_lock);
    if (!api->scheduler_closed) {
        struct lq_scheduler_stats stats = {0};
        lq_scheduler_stats(api->scheduler, &stats);
        gauges.queued = stats.queued;
        gauges.running = stats.running;
        gauges.deferred = stats.deferred;
    }
    pthread_rwlock_unlock(&api->scheduler_lock);
    gauges.draining = atomic_load(&api->draining);
    if (api->jobs) lq_jobs_count(api->jobs, gauges.jobs);
    size_t count = 0;
    struct lq_served_model **models = lq_registry_list(api->registry, &count);
    struct lq_metrics_model *entries = calloc(count + 1, sizeof *entries);
    for (size_t i = 0; models && entries && i < count; i++)
        entries[i] = (struct lq_metrics_model){models[i]->name, models[i]->memory_bytes,
                                               models[i]->bits_per_param};
    struct lq_backend *backend = lq_registry_backend(api->registry);
    backend->ops->memory(backend, &gauges.device_memory);
    gauges.device = backend->ops->name;
    gauges.models = entries;
    gauges.n_models = entries && models ? count : 0;
    size_t length = 0;
    char *text = lq_metrics_render(api->metrics, &gauges, &length);
    if (text)
        lq_http_respond(request, 200, "text/plain; version=0.0.4; charset=utf-8", text, length);
    else
        lq_http_respond_error(request, 500, "server_error", NULL, NULL, "out of memory");
    free(text);
    free(entries);
    for (size_t i = 0; models && i < count; i++) lq_served_model_release(models[i]);
    free(models);
}
