/* GET /v1/adapters, POST /v1/adapters/load and POST /v1/adapters/unload: LoRA adapters served on
 * top of the models (server/registry.h), which clients name as "model:adapter" in completions
 * and chat. Loading under a name already served replaces the adapter while requests run: the
 * registry publishes the new one only once it is read, checked and on the device, and each
 * request finishes on the version it started with. Paths are confined to the model
 * directories and STATE_DIR/adapters (where the finetune jobs write). */
#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "server/api.h"
#include "server/api_request.h"
#include "server/log.h"

static int refuse(struct lq_http_request *request, const struct lq_api_error *e) {
    return lq_http_respond_error(request, e->status, e->type, e->code,
                                 e->param[0] ? e->param : NULL, "%s", e->message);
}

cJSON *lq_api_adapter_json(const struct lq_served_adapter *a) {
    char id[160];
    snprintf(id, sizeof id, "%s:%s", a->model->name, a->name);
    cJSON *json = cJSON_CreateObject();
    cJSON_AddStringToObject(json, "id", id);
    cJSON_AddStringToObject(json, "object", "adapter");
    cJSON_AddStringToObject(json, "model", a->model->name);
    cJSON_AddStringToObject(json, "name", a->name);
    cJSON_AddStringToObject(json, "path", a->path);
    cJSON_AddStringToObject(json, "mode", lq_adapter_mode_name(a->adapter->mode));
    cJSON_AddNumberToObject(json, "rank", a->rank);
    cJSON_AddNumberToObject(json, "loaded_at", (double)a->loaded_at);
    cJSON_AddNumberToObject(json, "version", (double)a->version);
    cJSON_AddNumberToObject(json, "memory_bytes", (double)a->memory_bytes);
    return json;
}

void lq_api_adapters_list(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t count = 0;
    struct lq_served_adapter **adapters = lq_registry_adapter_list(api->registry, &count);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    for (size_t i = 0; adapters && i < count; i++) {
        cJSON_AddItemToArray(data, lq_api_adapter_json(adapters[i]));
        lq_served_adapter_release(adapters[i]);
    }
    free(adapters);
    lq_http_respond_json(request, 200, root);
    cJSON_Delete(root);
}

void lq_api_adapters_load(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t length;
    const char *body = lq_http_request_body(request, &length);
    struct lq_adapter_request req;
    struct lq_api_error e = {0};
    if (lq_adapter_request_parse(body, length, 0, &req, &e)) {
        refuse(request, &e);
        return;
    }
    struct lq_served_model *base = lq_registry_get(api->registry, req.model);
    if (!base) {
        lq_http_respond_error(request, 404, "invalid_request_error", "model_not_found", "model",
                              "the model '%s' does not exist (GET /v1/models lists them)",
                              req.model);
        lq_adapter_request_free(&req);
        return;
    }
    /* the model directories, then STATE_DIR/adapters */
    char *roots[64 + 1], real[PATH_MAX];
    size_t n_roots = 0;
    for (size_t i = 0; i < api->config.n_model_roots && n_roots < 64; i++)
        roots[n_roots++] = api->config.model_roots[i];
    if (api->config.adapters_dir) roots[n_roots++] = api->config.adapters_dir;
    if (lq_api_confine(roots, n_roots, req.path, "path", real, &e)) {
        refuse(request, &e);
        goto done;
    }
    struct lq_error err = {0};
    double started = lq_http_now();
    int rc = lq_registry_adapter_load(api->registry, req.model, req.name, real, &err);
    if (rc) {
        /* 404 when the model went away meanwhile, 409 when it was swapped, 507 out of memory;
         * anything about the adapter itself (unreadable, malformed, not fitting) is a 400 */
        struct lq_served_model *now = lq_registry_get(api->registry, req.model);
        int status = rc == LQ_ENOMEM ? 507 : !now ? 404 : now != base ? 409 : 400;
        lq_served_model_release(now);
        lq_http_respond_error(request, status,
                              status == 507 ? "server_error" : "invalid_request_error",
                              status == 404   ? "model_not_found"
                              : status == 409 ? "conflict"
                                              : "adapter_load_failed",
                              status == 400 ? "path" : "model", "cannot load adapter '%s': %s",
                              req.path, err.message);
        goto done;
    }
    lq_log(LQ_LOG_INFO, "adapter loaded", LQ_LOG_STR("model", req.model),
           LQ_LOG_STR("name", req.name), LQ_LOG_STR("path", real),
           LQ_LOG_NUM("seconds", lq_http_now() - started));
    struct lq_served_adapter *loaded = lq_registry_adapter_get(api->registry, req.model, req.name);
    if (loaded) {
        cJSON *json = lq_api_adapter_json(loaded);
        lq_http_respond_json(request, 200, json);
        cJSON_Delete(json);
        lq_served_adapter_release(loaded);
    } else { /* unloaded again meanwhile */
        lq_http_respond_error(request, 409, "invalid_request_error", "conflict", "name",
                              "the adapter '%s' was unloaded while loading", req.name);
    }
done:
    lq_served_model_release(base);
    lq_adapter_request_free(&req);
}

void lq_api_adapters_unload(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t length;
    const char *body = lq_http_request_body(request, &length);
    struct lq_adapter_request req;
    struct lq_api_error e = {0};
    if (lq_adapter_request_parse(body, length, 1, &req, &e)) {
        refuse(request, &e);
        return;
    }
    struct lq_error err = {0};
    if (lq_registry_adapter_unload(api->registry, req.model, req.name, &err)) {
        lq_http_respond_error(request, 404, "invalid_request_error", "adapter_not_found", "name",
                              "the model '%s' has no adapter '%s'", req.model, req.name);
    } else {
        lq_log(LQ_LOG_INFO, "adapter unloaded", LQ_LOG_STR("model", req.model),
               LQ_LOG_STR("name", req.name));
        char id[160];
        snprintf(id, sizeof id, "%s:%s", req.model, req.name);
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "id", id);
        cJSON_AddStringToObject(root, "object", "adapter");
        cJSON_AddBoolToObject(root, "deleted", 1);
        lq_http_respond_json(request, 200, root);
        cJSON_Delete(root);
    }
    lq_adapter_request_free(&req);
}
