/* GET /v1/models (OpenAI's list, plus what lqd knows: bits/param, memory, context),
 * GET /v1/models/{id}, GET /v1/models/{id}/allocation.svg, and loading and unloading models
 * (POST /v1/models/load under an existing name is a hot swap, done by the registry). Paths a
 * client names are confined to the configured model directories. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/chat_template.h"
#include "core/lq_model_file.h"
#include "server/allocation_svg.h"
#include "server/api.h"
#include "server/api_request.h"
#include "server/log.h"

static int refuse(struct lq_http_request *request, const struct lq_api_error *e) {
    return lq_http_respond_error(request, e->status, e->type, e->code,
                                 e->param[0] ? e->param : NULL, "%s", e->message);
}

static int served_context(const struct lq_api *api, const struct lq_served_model *served) {
    int maximum = served->model->config.max_seq_len;
    return api->config.context > 0 && api->config.context < maximum ? api->config.context : maximum;
}

/* One entry of the list: OpenAI's id/object/created/owned_by, then lqd's fields. */
static cJSON *model_json(const struct lq_api *api, const struct lq_served_model *served) {
    const struct lq_model_config *config = &served->model->config;
    cJSON *model = cJSON_CreateObject();
    cJSON_AddStringToObject(model, "id", served->name);
    cJSON_AddStringToObject(model, "object", "model");
    cJSON_AddNumberToObject(model, "created", (double)served->created);
    cJSON_AddStringToObject(model, "owned_by", "lqd");
    int quantized = served->bits_per_param > 0 && served->bits_per_param < 32;
    cJSON_AddStringToObject(model, "quantization", quantized ? "lq" : "none");
    cJSON_AddNumberToObject(model, "bits_per_param", served->bits_per_param);
    cJSON_AddNumberToObject(model, "effective_bits_per_param", served->effective_bits);
    cJSON_AddNumberToObject(model, "memory_bytes", (double)served->memory_bytes);
    cJSON_AddNumberToObject(model, "context_length", served_context(api, served));
    cJSON_AddNumberToObject(model, "max_position_embeddings", config->max_seq_len);
    cJSON_AddNumberToObject(model, "vocab_size", config->vocab_size);
    cJSON_AddNumberToObject(model, "n_layers", config->n_layers);
    cJSON_AddNumberToObject(model, "hidden_size", config->dim);
    cJSON_AddStringToObject(model, "chat_format", lq_chat_format_name(served->chat_style.format));
    /* The system message the template puts first when a conversation has none, or null. */
    if (served->chat_style.default_system)
        cJSON_AddStringToObject(model, "chat_default_system", served->chat_style.default_system);
    else
        cJSON_AddNullToObject(model, "chat_default_system");
    cJSON_AddStringToObject(model, "path", served->path);
    char link[160];
    snprintf(link, sizeof link, "/v1/models/%s/allocation.svg", served->name);
    cJSON_AddStringToObject(model, "allocation_svg", link);
    return model;
}

/* An adapter's entry, "model:adapter": its base model's entry under the adapter's id, with
 * "parent" naming the base and "adapter" what GET /v1/adapters says of it. */
static cJSON *adapter_model_json(const struct lq_api *api, const struct lq_served_adapter *a) {
    cJSON *model = model_json(api, a->model);
    cJSON *adapter = lq_api_adapter_json(a);
    cJSON_ReplaceItemInObjectCaseSensitive(
        model, "id",
        cJSON_CreateString(cJSON_GetObjectItemCaseSensitive(adapter, "id")->valuestring));
    cJSON_ReplaceItemInObjectCaseSensitive(model, "created",
                                           cJSON_CreateNumber((double)a->loaded_at));
    cJSON_AddStringToObject(model, "parent", a->model->name);
    cJSON_AddItemToObject(model, "adapter", adapter);
    return model;
}

void lq_api_models_list(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t count = 0, n_adapters = 0;
    struct lq_served_model **models = lq_registry_list(api->registry, &count);
    struct lq_served_adapter **adapters = lq_registry_adapter_list(api->registry, &n_adapters);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    for (size_t i = 0; models && i < count; i++) {
        cJSON_AddItemToArray(data, model_json(api, models[i]));
        lq_served_model_release(models[i]);
    }
    for (size_t i = 0; adapters && i < n_adapters; i++) { /* then "model:adapter" entries */
        cJSON_AddItemToArray(data, adapter_model_json(api, adapters[i]));
        lq_served_adapter_release(adapters[i]);
    }
    free(models);
    free(adapters);
    lq_http_respond_json(request, 200, root);
    cJSON_Delete(root);
}

/* The model (and, for "model:adapter", the adapter) a path names; NULL after a 404. */
static struct lq_served_model *find(struct lq_api *api, struct lq_http_request *request,
                                    struct lq_served_adapter **adapter) {
    const char *id = lq_http_request_path_param(request);
    char base[72], name[72];
    struct lq_served_model *served = NULL;
    *adapter = NULL;
    if (id && lq_model_id_split(id, base, sizeof base, name, sizeof name) == 0 && name[0]) {
        if ((*adapter = lq_registry_adapter_get(api->registry, base, name)))
            served = lq_served_model_retain((*adapter)->model);
    } else if (id) {
        served = lq_registry_get(api->registry, id);
    }
    if (!served)
        lq_http_respond_error(request, 404, "invalid_request_error", "model_not_found", "model",
                              "the model '%s' does not exist", id ? id : "");
    return served;
}

void lq_api_models_get(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    struct lq_served_adapter *adapter;
    struct lq_served_model *served = find(api, request, &adapter);
    if (!served) return;
    cJSON *model = adapter ? adapter_model_json(api, adapter) : model_json(api, served);
    lq_http_respond_json(request, 200, model);
    cJSON_Delete(model);
    lq_served_adapter_release(adapter);
    lq_served_model_release(served);
}

/* An adapter's allocation is its base model's: the adapter changes only L1·L2. */
void lq_api_models_allocation(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    struct lq_served_adapter *adapter;
    struct lq_served_model *served = find(api, request, &adapter);
    lq_served_adapter_release(adapter);
    if (!served) return;
    struct lq_model_summary summary = {0};
    struct lq_error err = {0};
    char *svg = NULL, rank[32];
    size_t length = 0;
    struct lq_allocation_labels labels;
    lq_allocation_labels_read(served->path, &labels, rank, sizeof rank);
    labels.title = served->name;
    if (lq_model_summary_compute(served->model, &summary, &err) ||
        lq_allocation_svg_string(&labels, &summary, served->model->config.n_layers, &svg, &length,
                                 &err))
        lq_http_respond_error(request, 500, "server_error", NULL, NULL, "%s", err.message);
    else
        lq_http_respond(request, 200, "image/svg+xml", svg, length);
    free(svg);
    lq_model_summary_free(&summary);
    lq_served_model_release(served);
}

/* ---------- load / unload ---------- */

static int inside_roots(char *const *roots, size_t n_roots, const char *real) {
    for (size_t i = 0; i < n_roots; i++) {
        size_t length = strlen(roots[i]);
        if (strncmp(real, roots[i], length) == 0 &&
            (real[length] == '/' || real[length] == '\0' || (length == 1 && roots[i][0] == '/')))
            return 1;
    }
    return 0;
}

/* 1 when an entry of directory resolves outside the roots. */
static int directory_escapes(char *const *roots, size_t n_roots, const char *directory) {
    DIR *dir = opendir(directory);
    struct dirent *entry;
    int escape = 0;
    while (dir && !escape && (entry = readdir(dir))) {
        if (entry->d_name[0] == '.' &&
            (!entry->d_name[1] || (entry->d_name[1] == '.' && !entry->d_name[2])))
            continue;
        char inner[PATH_MAX * 2], resolved[PATH_MAX];
        snprintf(inner, sizeof inner, "%s/%s", directory, entry->d_name);
        escape = realpath(inner, resolved) && !inside_roots(roots, n_roots, resolved);
    }
    if (dir) closedir(dir);
    return escape;
}

/* Resolves a client's path to a real path inside the roots: ".." is refused outright, a
 * relative path is looked up under each root in turn, and the result (and, for a directory,
 * every entry in it) must resolve inside one, so symbolic links cannot lead out. */
int lq_api_confine(char *const *roots, size_t n_roots, const char *path, const char *param,
                   char *real, struct lq_api_error *e) {
    if (n_roots == 0)
        return lq_api_error_set(e, 403, "loading_disabled", param,
                                "loading models is disabled: start lqd serve with --models-dir");
    for (const char *p = path; *p;) {
        const char *end = strchr(p, '/');
        size_t length = end ? (size_t)(end - p) : strlen(p);
        if (length == 2 && p[0] == '.' && p[1] == '.')
            return lq_api_error_set(e, 403, "path_not_allowed", param, "'%s' may not contain '..'",
                                    param);
        p += length + (end ? 1 : 0);
    }
    int found = 0;
    if (path[0] == '/') {
        found = realpath(path, real) != NULL;
    } else {
        for (size_t i = 0; i < n_roots && !found; i++) {
            char joined[PATH_MAX * 2];
            snprintf(joined, sizeof joined, "%s/%s", roots[i], path);
            found = realpath(joined, real) != NULL;
        }
    }
    if (!found)
        return lq_api_error_set(e, 404, "path_not_found", param,
                                "'%s' does not exist in the directories lqd loads from", path);
    if (!inside_roots(roots, n_roots, real))
        return lq_api_error_set(e, 403, "path_not_allowed", param,
                                "'%s' is outside the directories lqd loads from", path);
    /* The loader reads the directory (a model file's: its tokenizer beside it). */
    char directory[PATH_MAX];
    snprintf(directory, sizeof directory, "%s", real);
    struct stat info;
    if (stat(real, &info) == 0 && !S_ISDIR(info.st_mode)) {
        char *slash = strrchr(directory, '/');
        if (slash) slash[slash == directory ? 1 : 0] = '\0';
    }
    if (directory_escapes(roots, n_roots, directory))
        return lq_api_error_set(e, 403, "path_not_allowed", param,
                                "'%s' holds a link that leads outside the directories lqd loads "
                                "from",
                                path);
    return 0;
}

/* "models/foo-2bit/" -> "foo-2bit"; "x/stories.bin" -> "stories". */
static void name_from_path(const char *real, char *name, size_t size) {
    const char *slash = strrchr(real, '/');
    snprintf(name, size, "%.64s", slash ? slash + 1 : real);
    char *dot = strrchr(name, '.');
    if (dot && dot != name && (strcmp(dot, ".bin") == 0 || strcmp(dot, ".safetensors") == 0))
        *dot = '\0';
    for (char *p = name; *p; p++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-", *p))
            *p = '_';
}

void lq_api_models_load(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t length;
    const char *body = lq_http_request_body(request, &length);
    struct lq_model_request req;
    struct lq_api_error e = {0};
    if (lq_model_request_parse(body, length, 0, &req, &e)) {
        refuse(request, &e);
        return;
    }
    char real[PATH_MAX], tokenizer[PATH_MAX], name[72];
    const struct lq_api_config *config = &api->config;
    if (lq_api_confine(config->model_roots, config->n_model_roots, req.path, "path", real, &e) ||
        (req.tokenizer && lq_api_confine(config->model_roots, config->n_model_roots, req.tokenizer,
                                         "tokenizer", tokenizer, &e))) {
        refuse(request, &e);
        lq_model_request_free(&req);
        return;
    }
    if (req.name)
        snprintf(name, sizeof name, "%s", req.name);
    else
        name_from_path(real, name, sizeof name);
    if (!lq_model_name_valid(name)) {
        lq_http_respond_error(request, 400, "invalid_request_error", "invalid_value", "name",
                              "cannot derive a model name from '%s': give 'name'", req.path);
        lq_model_request_free(&req);
        return;
    }
    struct lq_error err = {0};
    double started = lq_http_now();
    int rc = lq_registry_load(api->registry, name, real, req.tokenizer ? tokenizer : NULL, &err);
    if (rc) {
        int status = rc == LQ_ENOMEM ? 507 : rc == LQ_ENOTFOUND ? 404 : 422;
        lq_http_respond_error(
            request, status, status == 507 ? "server_error" : "invalid_request_error",
            "model_load_failed", "path", "cannot load '%s': %s", req.path, err.message);
        lq_model_request_free(&req);
        return;
    }
    lq_log(LQ_LOG_INFO, "model loaded", LQ_LOG_STR("name", name), LQ_LOG_STR("path", real),
           LQ_LOG_NUM("seconds", lq_http_now() - started));
    struct lq_served_model *served = lq_registry_get(api->registry, name);
    if (served) {
        cJSON *model = model_json(api, served);
        lq_http_respond_json(request, 200, model);
        cJSON_Delete(model);
        lq_served_model_release(served);
    } else { /* unloaded again meanwhile */
        lq_http_respond_error(request, 409, "invalid_request_error", "conflict", "name",
                              "the model '%s' was unloaded while loading", name);
    }
    lq_model_request_free(&req);
}

void lq_api_models_unload(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    size_t length;
    const char *body = lq_http_request_body(request, &length);
    struct lq_model_request req;
    struct lq_api_error e = {0};
    if (lq_model_request_parse(body, length, 1, &req, &e)) {
        refuse(request, &e);
        return;
    }
    struct lq_error err = {0};
    if (lq_registry_unload(api->registry, req.name, &err)) {
        lq_http_respond_error(request, 404, "invalid_request_error", "model_not_found", "name",
                              "the model '%s' does not exist", req.name);
    } else {
        lq_log(LQ_LOG_INFO, "model unloaded", LQ_LOG_STR("name", req.name));
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "id", req.name);
        cJSON_AddStringToObject(root, "object", "model");
        cJSON_AddBoolToObject(root, "deleted", 1);
        lq_http_respond_json(request, 200, root);
        cJSON_Delete(root);
    }
    lq_model_request_free(&req);
}
