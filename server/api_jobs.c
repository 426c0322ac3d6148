/* Background jobs over HTTP: POST /v1/jobs (a compress or finetune job), GET /v1/jobs, GET
 * /v1/jobs/{id}, GET /v1/jobs/{id}/events (a JSON array, or Server-Sent Events until the job ends
 * with Accept: text/event-stream) and POST /v1/jobs/{id}/cancel. Everything a client can get wrong
 * (unknown model, infeasible budget, rank, paths outside the model directories) is refused
 * here with a 4xx before a job exists; the work itself is server/jobs.c's. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/compress.h"
#include "core/file_util.h"
#include "core/ilp.h"
#include "core/nf.h"
#include "core/train.h"
#include "server/api.h"
#include "server/api_request.h"
#include "server/jobs.h"

static int refuse(struct lq_http_request *request, const struct lq_api_error *e) {
    return lq_http_respond_error(request, e->status, e->type ? e->type : "invalid_request_error",
                                 e->code, e->param[0] ? e->param : NULL, "%s", e->message);
}

static int jobs_available(struct lq_api *api, struct lq_http_request *request) {
    if (api->jobs) return 1;
    lq_http_respond_error(request, 503, "server_error", "jobs_unavailable", NULL,
                          "background jobs are not available on this daemon");
    return 0;
}

static int job_not_found(struct lq_http_request *request, const char *id) {
    return lq_http_respond_error(request, 404, "invalid_request_error", "job_not_found", "id",
                                 "the job '%s' does not exist", id ? id : "");
}

/* ---------- POST /v1/jobs: validation ---------- */

static int inside_roots(const struct lq_api_config *config, const char *real) {
    for (size_t i = 0; i < config->n_model_roots; i++) {
        size_t length = strlen(config->model_roots[i]);
        if (strncmp(real, config->model_roots[i], length) == 0 &&
            (real[length] == '/' || (length == 1 && config->model_roots[i][0] == '/')))
            return 1;
    }
    return 0;
}

/* The output directory as an absolute path inside a model directory: a relative one is made
 * under the first --models-dir; its parent must exist, it must not. */
static int resolve_output(const struct lq_api_config *config, const char *path, char *out,
                          struct lq_api_error *e) {
    if (config->n_model_roots == 0)
        return lq_api_error_set(e, 403, "loading_disabled", "output",
                                "jobs write under --models-dir: start lqd serve with one");
    if (!*path || strlen(path) >= PATH_MAX / 2)
        return lq_api_error_set(e, 400, "invalid_value", "output", "'output' is empty or too long");
    for (const char *p = path; *p;) {
        const char *end = strchr(p, '/');
        size_t length = end ? (size_t)(end - p) : strlen(p);
        if (length == 2 && p[0] == '.' && p[1] == '.')
            return lq_api_error_set(e, 403, "path_not_allowed", "output",
                                    "'output' may not contain '..'");
        p += length + (end ? 1 : 0);
    }
    char joined[PATH_MAX * 2], parent[PATH_MAX], real_parent[PATH_MAX];
    if (path[0] == '/')
        snprintf(joined, sizeof joined, "%s", path);
    else
        snprintf(joined, sizeof joined, "%s/%s", config->model_roots[0], path);
    size_t length = strlen(joined);
    while (length > 1 && joined[length - 1] == '/') joined[--length] = '\0';
    char *slash = strrchr(joined, '/');
    const char *base = slash + 1;
    if (!*base || strcmp(base, ".") == 0)
        return lq_api_error_set(e, 400, "invalid_value", "output", "'output' names no directory");
    snprintf(parent, sizeof parent, "%.*s", (int)(slash - joined), joined);
    if (!realpath(parent[0] ? parent : "/", real_parent))
        return lq_api_error_set(e, 404, "path_not_found", "output",
                                "the parent directory of '%s' does not exist", path);
    char whole[PATH_MAX * 2];
    if ((size_t)snprintf(whole, sizeof whole, "%s/%s", real_parent, base) >= PATH_MAX)
        return lq_api_error_set(e, 400, "invalid_value", "output", "'output' is too long");
    memcpy(out, whole, strlen(whole) + 1);
    if (!inside_roots(config, out))
        return lq_api_error_set(e, 403, "path_not_allowed", "output",
                                "'%s' is outside the model directories", path);
    struct stat info;
    if (lstat(out, &info) == 0)
        return lq_api_error_set(e, 409, "output_exists", "output", "'%s' already exists", path);
    return 0;
}

/* The smallest feasible budget of grid for model's matrices (as lq_compress computes it). */
static double min_budget(const struct lq_model *model, const struct lq_nf_config *grid,
                         size_t grid_size) {
    size_t n = (size_t)model->config.n_layers * LQ_LINEARS_PER_LAYER;
    double *storage = malloc(n * grid_size * sizeof *storage);
    double *cost = calloc(n * grid_size, sizeof *cost);
    size_t *numel = malloc(n * sizeof *numel);
    double minimum = NAN;
    if (storage && cost && numel) {
        for (size_t i = 0; i < n; i++) {
            const struct lq_linear *linear =
                &model->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
            numel[i] = (size_t)linear->rows * (size_t)linear->cols;
            for (size_t c = 0; c < grid_size; c++)
                storage[i * grid_size + c] = lq_nf_storage_bits(numel[i], &grid[c]);
        }
        struct lq_ilp_problem problem = {n, grid_size, cost, storage, numel, 0.0};
        minimum = lq_ilp_min_budget(&problem);
    }
    free(storage);
    free(cost);
    free(numel);
    return minimum;
}

/* The largest rank every matrix allows, and whether the model is full precision. */
static int max_rank(const struct lq_model *model, int *dense) {
    int largest = INT_MAX;
    *dense = 1;
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *linear = &model->layers[l].linear[k];
            int smaller = linear->rows < linear->cols ? linear->rows : linear->cols;
            if (smaller < largest) largest = smaller;
            if (linear->is_lq || !linear->dense) *dense = 0;
        }
    return largest;
}

static int get_integer(const cJSON *body, const char *key, double min, double max, double otherwise,
                       double *out, struct lq_api_error *e) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(body, key);
    if (!item || cJSON_IsNull(item)) {
        *out = otherwise;
        return 0;
    }
    if (!cJSON_IsNumber(item) || item->valuedouble != floor(item->valuedouble) ||
        item->valuedouble < min || item->valuedouble > max)
        return lq_api_error_set(e, 400, "invalid_value", key,
                                "'%s' must be an integer in [%.0f, %.0f]", key, min, max);
    *out = item->valuedouble;
    return 0;
}

static const char *get_string(const cJSON *body, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(body, key);
    return cJSON_IsString(item) ? item->valuestring : NULL;
}

/* ---------- finetune jobs ---------- */

static int get_number(const cJSON *body, const char *key, double min, double max, double otherwise,
                      double *out, struct lq_api_error *e) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(body, key);
    if (!item || cJSON_IsNull(item)) {
        *out = otherwise;
        return 0;
    }
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble < min ||
        item->valuedouble > max)
        return lq_api_error_set(e, 400, "invalid_value", key, "'%s' must be a number in [%g, %g]",
                                key, min, max);
    *out = item->valuedouble;
    return 0;
}

/* A string field that may be absent or null: NULL then; -1 (e filled) when not a string. */
static int get_optional_string(const cJSON *body, const char *key, const char **out,
                               struct lq_api_error *e) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(body, key);
    *out = NULL;
    if (!item || cJSON_IsNull(item)) return 0;
    if (!cJSON_IsString(item))
        return lq_api_error_set(e, 400, "invalid_value", key, "'%s' must be a string", key);
    *out = item->valuestring;
    return 0;
}

/* An uploaded file by id: its path and record (404 for an unknown id). */
static int resolve_upload(struct lq_api *api, const char *key, const char *id, char *path,
                          size_t size, struct lq_file_info *info, struct lq_api_error *e) {
    if (!api->files)
        return lq_api_error_set(e, 503, "files_unavailable", key,
                                "uploaded files are not available on this daemon");
    struct lq_error err = {0};
    if (lq_files_resolve(api->files, id, path, size, info, &err))
        return lq_api_error_set(e, 404, "file_not_found", key, "'%s': %s", key, err.message);
    return 0;
}

/* Whether every linear of model is an LQ matrix with a low-rank part (init "lq" trains it). */
static int trainable_lq(const struct lq_model *model) {
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
            if (!model->layers[l].linear[k].is_lq || model->layers[l].linear[k].rank < 1) return 0;
    return 1;
}

static int parse_finetune_job(struct lq_api *api, const cJSON *body, struct lq_job_spec *s,
                              struct lq_api_error *e) {
    struct lq_finetune_job_spec *f = &s->finetune;
    s->type = LQ_JOB_FINETUNE;
    const char *model = NULL, *training = NULL, *validation = NULL, *adapter = NULL;
    const char *init = NULL, *schedule = NULL, *format = NULL;
    if (get_optional_string(body, "model", &model, e) ||
        get_optional_string(body, "training_file", &training, e) ||
        get_optional_string(body, "validation_file", &validation, e) ||
        get_optional_string(body, "adapter", &adapter, e) ||
        get_optional_string(body, "init", &init, e) ||
        get_optional_string(body, "schedule", &schedule, e) ||
        get_optional_string(body, "format", &format, e))
        return -1;
    if (!model)
        return lq_api_error_set(e, 400, "missing_field", "model", "'model' (a string) is required");
    if (!training)
        return lq_api_error_set(e, 400, "missing_field", "training_file",
                                "'training_file' (the id of an uploaded file) is required");
    if (!adapter)
        return lq_api_error_set(e, 400, "missing_field", "adapter",
                                "'adapter' (the name of the adapter to create) is required");
    if (!lq_model_name_valid(adapter))
        return lq_api_error_set(
            e, 400, "invalid_value", "adapter",
            "'%.80s' is not a usable adapter name (1 to 64 of A-Z a-z 0-9 . _ -, "
            "not starting with '.')",
            adapter);
    snprintf(s->name, sizeof s->name, "%s", adapter);
    double number = 0;
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(body, "steps");
    const cJSON *epochs = cJSON_GetObjectItemCaseSensitive(body, "epochs");
    if (steps && !cJSON_IsNull(steps) && epochs && !cJSON_IsNull(epochs))
        return lq_api_error_set(e, 400, "invalid_value", "steps",
                                "give 'steps' or 'epochs', not both");
    if (get_integer(body, "steps", 1, 1e9, 0, &number, e)) return -1;
    f->steps = (long)number;
    if (get_number(body, "epochs", 1e-6, 1e4, 1.0, &f->epochs, e)) return -1;
    if (get_number(body, "validation_fraction", 0, 0.99, 0, &f->validation_fraction, e)) return -1;
    if (validation && f->validation_fraction > 0)
        return lq_api_error_set(e, 400, "invalid_value", "validation_fraction",
                                "give 'validation_file' or 'validation_fraction', not both");
    if (get_number(body, "learning_rate", 0, 10, 2e-4, &f->learning_rate, e) ||
        get_number(body, "weight_decay", 0, 1e3, 0, &f->weight_decay, e) ||
        get_number(body, "max_grad_norm", 0, 1e12, 1.0, &f->max_grad_norm, e))
        return -1;
    if (get_integer(body, "batch_size", 1, 1 << 16, 8, &number, e)) return -1;
    f->batch_size = (int)number;
    if (get_integer(body, "micro_batch", 1, f->batch_size, f->batch_size < 4 ? f->batch_size : 4,
                    &number, e))
        return -1;
    f->micro_batch = (int)number;
    if (get_integer(body, "warmup", 0, 1e9, 0, &number, e)) return -1;
    f->warmup = (int)number;
    if (get_integer(body, "eval_every", 0, 1e9, 0, &number, e)) return -1;
    f->eval_every = (int)number;
    if (get_integer(body, "checkpoint_every", 0, 1e9, 0, &number, e)) return -1;
    f->checkpoint_every = (int)number;
    if (get_integer(body, "seed", 0, 9007199254740991.0, 0, &number, e)) return -1;
    s->seed = (unsigned long long)number;
    enum lq_lr_schedule parsed_schedule;
    if (schedule && lq_lr_schedule_parse(schedule, &parsed_schedule, NULL))
        return lq_api_error_set(e, 400, "invalid_value", "schedule",
                                "'schedule' must be \"cosine\", \"linear\" or \"constant\"");
    snprintf(f->schedule, sizeof f->schedule, "%s", schedule ? schedule : "cosine");
    if (init && strcmp(init, "lq") != 0 && strcmp(init, "zero") != 0)
        return lq_api_error_set(e, 400, "invalid_value", "init",
                                "'init' must be \"lq\" or \"zero\"");
    const cJSON *rank = cJSON_GetObjectItemCaseSensitive(body, "rank");
    if (init && strcmp(init, "lq") == 0 && rank && !cJSON_IsNull(rank))
        return lq_api_error_set(
            e, 400, "invalid_value", "rank",
            "'rank' applies to \"init\": \"zero\" (\"lq\" trains the model's own "
            "rank)");
    if (get_integer(body, "rank", 1, 4096, 8, &number, e)) return -1;
    f->rank = (int)number;
    const cJSON *activate = cJSON_GetObjectItemCaseSensitive(body, "activate");
    if (activate && !cJSON_IsBool(activate) && !cJSON_IsNull(activate))
        return lq_api_error_set(e, 400, "invalid_value", "activate",
                                "'activate' must be a boolean");
    s->activate = cJSON_IsTrue(activate);
    enum lq_dataset_format parsed_format = LQ_DATASET_AUTO;
    if (format && lq_dataset_format_parse(format, &parsed_format))
        return lq_api_error_set(e, 400, "invalid_value", "format",
                                "'format' must be \"auto\", \"plain\", \"text\", "
                                "\"prompt-completion\" or \"chat\"");

    /* The files: the training file's own format (detected at upload) unless one is given. */
    struct lq_file_info info;
    if (resolve_upload(api, "training_file", training, f->training_path, sizeof f->training_path,
                       &info, e))
        return -1;
    snprintf(f->training_file, sizeof f->training_file, "%s", info.id);
    snprintf(f->training_name, sizeof f->training_name, "%s", info.filename);
    f->format = (int)(parsed_format != LQ_DATASET_AUTO ? parsed_format : info.format);
    if (validation) {
        struct lq_file_info vinfo;
        if (resolve_upload(api, "validation_file", validation, f->validation_path,
                           sizeof f->validation_path, &vinfo, e))
            return -1;
        snprintf(f->validation_file, sizeof f->validation_file, "%s", vinfo.id);
        snprintf(f->validation_name, sizeof f->validation_name, "%s", vinfo.filename);
        if (parsed_format == LQ_DATASET_AUTO && vinfo.format != info.format)
            return lq_api_error_set(e, 400, "invalid_value", "validation_file",
                                    "the validation file is %s and the training file %s: give "
                                    "files of one format",
                                    lq_dataset_format_name(vinfo.format),
                                    lq_dataset_format_name(info.format));
    }

    /* The model: served, trainable the way init asks, its context long enough. */
    struct lq_served_model *served = lq_registry_get(api->registry, model);
    if (!served)
        return lq_api_error_set(e, 404, "model_not_found", "model",
                                "the model '%.64s' does not exist", model);
    snprintf(s->model, sizeof s->model, "%s", served->name);
    snprintf(s->source, sizeof s->source, "%s", served->path);
    int lq = trainable_lq(served->model), context = served->model->config.max_seq_len, rc = 0;
    int has_tokenizer = served->tokenizer != NULL;
    lq_served_model_release(served);
    snprintf(f->init, sizeof f->init, "%s", init ? init : lq ? "lq" : "zero");
    if (strcmp(f->init, "lq") == 0 && !lq)
        return lq_api_error_set(
            e, 400, "invalid_value", "init",
            "the model '%s' is not LQ-compressed with a low-rank part: \"init\": "
            "\"lq\" needs one (use \"init\": \"zero\")",
            s->model);
    if (!has_tokenizer)
        return lq_api_error_set(e, 400, "invalid_value", "model",
                                "the model '%s' has no tokenizer to read the training file with",
                                s->model);
    if (get_integer(body, "seq_len", 2, context, context < 256 ? context : 256, &number, e))
        return -1;
    f->seq_len = (int)number;
    return rc;
}

/* ---------- a compress job's Fisher weighting ---------- */

/* fisher.KEY: absent or null gives otherwise; else an integer in [min, max]. */
static int fisher_integer(const cJSON *fisher, const char *key, double min, double max,
                          double otherwise, double *out, struct lq_api_error *e) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(fisher, key);
    char param[64];
    snprintf(param, sizeof param, "fisher.%s", key);
    if (!item || cJSON_IsNull(item)) {
        if (otherwise >= 0) {
            *out = otherwise;
            return 0;
        }
        return lq_api_error_set(e, 400, "missing_field", param,
                                "'%s' (an integer in [%.0f, %.0f]) is required", param, min, max);
    }
    if (!cJSON_IsNumber(item) || item->valuedouble != floor(item->valuedouble) ||
        item->valuedouble < min || item->valuedouble > max)
        return lq_api_error_set(e, 400, "invalid_value", param,
                                "'%s' must be an integer in [%.0f, %.0f]", param, min, max);
    *out = item->valuedouble;
    return 0;
}

/* The shape of "fisher": {"file", "samples", "seq_len", "seed"}; the file is resolved later
 * (fisher_resolve). Absent or null: unweighted. */
static int parse_fisher(const cJSON *body, struct lq_fisher_job_spec *f, struct lq_api_error *e) {
    const cJSON *fisher = cJSON_GetObjectItemCaseSensitive(body, "fisher");
    if (!fisher || cJSON_IsNull(fisher)) return 0;
    if (!cJSON_IsObject(fisher))
        return lq_api_error_set(e, 400, "invalid_value", "fisher",
                                "'fisher' must be an object {\"file\": \"file-...\", "
                                "\"samples\": N, \"seq_len\": L, \"seed\": S}");
    for (const cJSON *item = fisher->child; item; item = item->next) {
        static const char *const known[] = {"file", "samples", "seq_len", "seed"};
        int found = 0;
        for (size_t k = 0; k < sizeof known / sizeof *known; k++)
            found |= item->string && strcmp(item->string, known[k]) == 0;
        if (!found) {
            char param[64];
            snprintf(param, sizeof param, "fisher.%.48s", item->string ? item->string : "");
            return lq_api_error_set(e, 400, "invalid_value", param,
                                    "unknown field '%s': 'fisher' takes file, samples, seq_len "
                                    "and seed",
                                    param);
        }
    }
    const cJSON *file = cJSON_GetObjectItemCaseSensitive(fisher, "file");
    if (!file || cJSON_IsNull(file))
        return lq_api_error_set(e, 400, "missing_field", "fisher.file",
                                "'fisher.file' (the id of an uploaded calibration text) is "
                                "required");
    if (!cJSON_IsString(file) || !file->valuestring[0] ||
        strlen(file->valuestring) >= sizeof f->file)
        return lq_api_error_set(e, 400, "invalid_value", "fisher.file",
                                "'fisher.file' must be the id of an uploaded file (\"file-...\")");
    snprintf(f->file, sizeof f->file, "%s", file->valuestring);
    double number = 0;
    if (fisher_integer(fisher, "samples", 1, 1e8, -1, &number, e)) return -1;
    f->samples = (int)number;
    if (fisher_integer(fisher, "seq_len", 2, 1 << 24, 1024, &number, e)) return -1;
    f->seq_len = (int)number;
    if (fisher_integer(fisher, "seed", 0, 9007199254740991.0, 0, &number, e)) return -1;
    f->seed = (unsigned long long)number;
    return 0;
}

/* The calibration upload (404 for an unknown id) and enough documents in it: its non-empty
 * lines, trimmed, as lq_fisher_calibration_draw counts them. */
static int fisher_resolve(struct lq_api *api, struct lq_fisher_job_spec *f,
                          struct lq_api_error *e) {
    struct lq_file_info info;
    if (resolve_upload(api, "fisher.file", f->file, f->path, sizeof f->path, &info, e)) return -1;
    snprintf(f->file, sizeof f->file, "%s", info.id);
    snprintf(f->filename, sizeof f->filename, "%s", info.filename);
    FILE *text = fopen(f->path, "r");
    if (!text)
        return lq_api_error_set(e, 404, "file_not_found", "fisher.file",
                                "'fisher.file': the file '%s' was deleted", f->file);
    long lines = 0;
    int c, content = 0;
    while ((c = getc(text)) != EOF) {
        if (c == '\n') {
            lines += content, content = 0;
        } else if (c != ' ' && c != '\t' && c != '\r' && c != '\f' && c != '\v') {
            content = 1;
        }
    }
    lines += content;
    fclose(text);
    if (lines < f->samples)
        return lq_api_error_set(e, 400, "invalid_value", "fisher.samples",
                                "'fisher.samples' is %d but the calibration text %s (%s) has %ld "
                                "non-empty lines: at most that many sequences can be drawn",
                                f->samples, f->file, f->filename, lines);
    return 0;
}

static int parse_job(struct lq_api *api, const cJSON *body, struct lq_job_spec *s,
                     struct lq_api_error *e) {
    memset(s, 0, sizeof *s);
    if (!cJSON_IsObject(body))
        return lq_api_error_set(e, 400, "invalid_json", NULL, "the body must be a JSON object");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(body, "type");
    if (!cJSON_IsString(type))
        return lq_api_error_set(e, 400, "missing_field", "type",
                                "'type' is required: \"compress\" or \"finetune\"");
    if (strcmp(type->valuestring, "finetune") == 0) return parse_finetune_job(api, body, s, e);
    if (strcmp(type->valuestring, "compress") != 0)
        return lq_api_error_set(e, 400, "invalid_value", "type",
                                "unknown job type '%.64s': \"compress\" or \"finetune\"",
                                type->valuestring);
    const char *model = get_string(body, "model");
    if (!model)
        return lq_api_error_set(e, 400, "missing_field", "model", "'model' (a string) is required");
    const cJSON *bits = cJSON_GetObjectItemCaseSensitive(body, "target_bits");
    if (!cJSON_IsNumber(bits) || !(bits->valuedouble > 0) || bits->valuedouble > 64)
        return lq_api_error_set(e, 400, "invalid_value", "target_bits",
                                "'target_bits' must be a number of bits per parameter in (0, 64]");
    s->target_bits = bits->valuedouble;
    double number = 0;
    if (get_integer(body, "rank", 0, 1 << 20, 64, &number, e)) return -1;
    s->rank = (int)number;
    if (get_integer(body, "iters", 1, 100000, 20, &number, e)) return -1;
    s->iters = (int)number;
    if (get_integer(body, "seed", 0, 9007199254740991.0, 0, &number, e)) return -1;
    s->seed = (unsigned long long)number;
    const cJSON *activate = cJSON_GetObjectItemCaseSensitive(body, "activate");
    if (activate && !cJSON_IsBool(activate) && !cJSON_IsNull(activate))
        return lq_api_error_set(e, 400, "invalid_value", "activate",
                                "'activate' must be a boolean");
    s->activate = cJSON_IsTrue(activate);
    const cJSON *configs = cJSON_GetObjectItemCaseSensitive(body, "configs");
    if (configs && !cJSON_IsNull(configs)) {
        /* A list or "table1", never a file name: clients do not read the daemon's files. */
        if (!cJSON_IsString(configs) || strlen(configs->valuestring) >= sizeof s->configs ||
            (strcmp(configs->valuestring, "table1") != 0 &&
             (!strchr(configs->valuestring, ',') || strchr(configs->valuestring, '/'))))
            return lq_api_error_set(e, 400, "invalid_value", "configs",
                                    "'configs' must be \"table1\" or a ';'-separated list of "
                                    "configurations (\"4,8,fp32,64,256;3,8,fp32,64,256\")");
        snprintf(s->configs, sizeof s->configs, "%s", configs->valuestring);
    } else {
        snprintf(s->configs, sizeof s->configs, "table1");
    }
    const char *output = get_string(body, "output");
    if (!output)
        return lq_api_error_set(e, 400, "missing_field", "output",
                                "'output' (a directory name under --models-dir) is required");
    const char *name = get_string(body, "name");
    const cJSON *name_item = cJSON_GetObjectItemCaseSensitive(body, "name");
    if (name_item && !cJSON_IsNull(name_item) && !name)
        return lq_api_error_set(e, 400, "invalid_value", "name", "'name' must be a string");
    if (parse_fisher(body, &s->fisher, e)) return -1;

    struct lq_served_model *served = lq_registry_get(api->registry, model);
    if (!served)
        return lq_api_error_set(e, 404, "model_not_found", "model",
                                "the model '%.64s' does not exist", model);
    snprintf(s->model, sizeof s->model, "%s", served->name);
    snprintf(s->source, sizeof s->source, "%s", served->path);
    int dense = 1, largest = max_rank(served->model, &dense), rc = 0;
    int has_tokenizer = served->tokenizer != NULL;
    struct lq_nf_config *grid = NULL;
    size_t grid_size = 0;
    struct lq_error err = {0};
    if (!dense) {
        rc = lq_api_error_set(e, 400, "invalid_value", "model",
                              "the model '%s' is already LQ-compressed: compress a "
                              "full-precision model",
                              s->model);
    } else if (s->fisher.file[0] && !has_tokenizer) {
        rc = lq_api_error_set(e, 400, "invalid_value", "fisher",
                              "the model '%s' has no tokenizer to read the Fisher calibration "
                              "text with",
                              s->model);
    } else if (s->rank > largest) {
        rc = lq_api_error_set(e, 400, "invalid_value", "rank",
                              "rank %d is larger than the smallest matrix of '%s' allows: at "
                              "most %d",
                              s->rank, s->model, largest);
    } else if (lq_compress_grid_parse(s->configs, &grid, &grid_size, &err)) {
        rc = lq_api_error_set(e, 400, "invalid_value", "configs", "'configs': %s", err.message);
    } else {
        double minimum = min_budget(served->model, grid, grid_size);
        /* Printed so that it reads back as itself: pasted into target_bits, it is feasible. */
        char text[64] = "?";
        for (int decimals = 6; decimals <= 20; decimals++) {
            snprintf(text, sizeof text, "%.*f", decimals, minimum);
            if (strtod(text, NULL) == minimum) break;
        }
        if (!(s->target_bits >= minimum))
            rc = lq_api_error_set(e, 400, "budget_infeasible", "target_bits",
                                  "target_bits %g is infeasible: the smallest feasible budget "
                                  "for this grid is %s bits/param (every matrix at its cheapest "
                                  "configuration)",
                                  s->target_bits, text);
    }
    free(grid);
    lq_served_model_release(served);
    if (rc) return rc;
    if (resolve_output(&api->config, output, s->output, e)) return -1;
    if (name) {
        snprintf(s->name, sizeof s->name, "%.71s", name);
    } else {
        const char *slash = strrchr(s->output, '/');
        snprintf(s->name, sizeof s->name, "%.71s", slash ? slash + 1 : s->output);
    }
    if (!lq_model_name_valid(s->name))
        return lq_api_error_set(e, 400, "invalid_value", "name",
                                "'%s' is not a usable model name: give 'name' (1 to 64 of "
                                "A-Z a-z 0-9 . _ -)",
                                s->name);
    if (s->fisher.file[0] && fisher_resolve(api, &s->fisher, e)) return -1;
    return 0;
}

void lq_api_jobs_create(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!jobs_available(api, request)) return;
    if (atomic_load(&api->draining)) {
        lq_http_respond_error(request, 503, "server_error", "draining", NULL,
                              "the daemon is shutting down");
        return;
    }
    size_t length;
    const char *text = lq_http_request_body(request, &length);
    cJSON *body = lq_json_parse(text, length);
    struct lq_job_spec spec;
    struct lq_api_error e = {0};
    if (!body && length) {
        lq_api_error_set(&e, 400, "invalid_json", NULL, "the body is not valid JSON");
        refuse(request, &e);
        return;
    }
    int rc = parse_job(api, body, &spec, &e);
    cJSON_Delete(body);
    if (rc) {
        refuse(request, &e);
        return;
    }
    cJSON *record = NULL;
    struct lq_error err = {0};
    if (lq_jobs_submit(api->jobs, &spec, &record, &err)) {
        int finetune = spec.type == LQ_JOB_FINETUNE;
        int status = err.code == LQ_ENOMEM || err.code == LQ_EIO ? 500
                     : err.code == LQ_ENOTFOUND                  ? 404
                                                                 : 409;
        const char *code = status == 500   ? NULL
                           : status == 404 ? "file_not_found"
                           : finetune      ? "adapter_exists"
                                           : "output_in_use";
        lq_http_respond_error(request, status,
                              status == 500 ? "server_error" : "invalid_request_error", code,
                              status == 404 ? (finetune ? "training_file" : "fisher.file")
                              : finetune    ? "adapter"
                                            : "output",
                              "%s", err.message);
        return;
    }
    lq_http_respond_json(request, 200, record);
    cJSON_Delete(record);
}

void lq_api_jobs_list(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!jobs_available(api, request)) return;
    cJSON *list = lq_jobs_list(api->jobs);
    lq_http_respond_json(request, 200, list);
    cJSON_Delete(list);
}

void lq_api_jobs_get(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!jobs_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    cJSON *record = id ? lq_jobs_get(api->jobs, id) : NULL;
    if (!record) {
        job_not_found(request, id);
        return;
    }
    lq_http_respond_json(request, 200, record);
    cJSON_Delete(record);
}

void lq_api_jobs_cancel(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!jobs_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    cJSON *record = NULL;
    struct lq_error err = {0};
    int rc = id ? lq_jobs_cancel(api->jobs, id, &record, &err) : LQ_ENOTFOUND;
    if (rc == LQ_ENOTFOUND)
        job_not_found(request, id);
    else if (rc)
        lq_http_respond_error(request, 409, "invalid_request_error", "job_finished", "id", "%s",
                              err.message);
    else
        lq_http_respond_json(request, 200, record);
    cJSON_Delete(record);
}

/* ---------- GET /v1/jobs/{id}/events ---------- */

/* Server-Sent Events: each line of the event log as "event: TYPE\ndata: JSON\n\n", read as it
 * grows, until the job has ended and every event is out; then "data: [DONE]". */
struct event_stream {
    struct lq_api *api;
    char id[64];
    char path[PATH_MAX + 64];
    long offset;   /* bytes of the log consumed */
    char *pending; /* formatted bytes not yet handed out */
    size_t n_pending, sent;
    int done; /* [DONE] queued */
};

static void event_stream_free(void *context) {
    struct event_stream *s = context;
    free(s->pending);
    free(s);
}

/* Formats the complete lines of the log past s->offset into s->pending; 1 if any. */
static int event_stream_fill(struct event_stream *s) {
    FILE *file = fopen(s->path, "r");
    if (!file) return 0;
    fseek(file, 0, SEEK_END);
    long end = ftell(file);
    if (end <= s->offset) {
        fclose(file);
        return 0;
    }
    size_t length = (size_t)(end - s->offset);
    char *chunk = malloc(length + 1);
    fseek(file, s->offset, SEEK_SET);
    size_t got = chunk ? fread(chunk, 1, length, file) : 0;
    fclose(file);
    char *last = NULL;
    for (size_t i = 0; i < got; i++)
        if (chunk[i] == '\n') last = chunk + i;
    if (!last) { /* a line still being written */
        free(chunk);
        return 0;
    }
    *last = '\0';
    s->offset += (long)(last - chunk) + 1;
    size_t capacity = (size_t)(last - chunk) * 2 + 256;
    char *out = malloc(capacity);
    size_t used = 0;
    char *save = NULL;
    for (char *line = strtok_r(chunk, "\n", &save); out && line;
         line = strtok_r(NULL, "\n", &save)) {
        cJSON *event = lq_json_parse(line, strlen(line));
        const char *type = "message";
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(event, "type");
        if (cJSON_IsString(t)) type = t->valuestring;
        size_t need = strlen(line) + strlen(type) + 32;
        if (used + need > capacity) {
            capacity = (used + need) * 2;
            char *grown = realloc(out, capacity);
            if (!grown) {
                cJSON_Delete(event);
                break;
            }
            out = grown;
        }
        used +=
            (size_t)snprintf(out + used, capacity - used, "event: %s\ndata: %s\n\n", type, line);
        cJSON_Delete(event);
    }
    free(chunk);
    free(s->pending);
    s->pending = out, s->n_pending = out ? used : 0, s->sent = 0;
    return s->n_pending > 0;
}

static ssize_t event_stream_read(void *context, struct lq_http_request *request, char *buffer,
                                 size_t size) {
    struct event_stream *s = context;
    for (;;) {
        if (s->sent < s->n_pending) {
            size_t n = s->n_pending - s->sent < size ? s->n_pending - s->sent : size;
            memcpy(buffer, s->pending + s->sent, n);
            s->sent += n;
            return (ssize_t)n;
        }
        if (s->done) return LQ_HTTP_STREAM_END;
        if (lq_http_request_client_gone(request)) return LQ_HTTP_STREAM_ABORT;
        /* Ended is read before the log, so the last events are in the file when it says so. */
        int ended = lq_jobs_finished(s->api->jobs, s->id) != 0;
        if (event_stream_fill(s)) continue;
        if (ended) {
            static const char done[] = "data: [DONE]\n\n";
            free(s->pending);
            s->pending = strdup(done);
            s->n_pending = s->pending ? strlen(done) : 0, s->sent = 0;
            s->done = 1;
            continue;
        }
        usleep(200 * 1000);
    }
}

void lq_api_jobs_events(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!jobs_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    const char *accept = lq_http_request_header(request, "Accept");
    if (id && accept && strstr(accept, "text/event-stream")) {
        struct event_stream *s = calloc(1, sizeof *s);
        if (!s) {
            lq_http_respond_error(request, 500, "server_error", NULL, NULL, "out of memory");
            return;
        }
        s->api = api;
        snprintf(s->id, sizeof s->id, "%s", id);
        if (lq_jobs_events_path(api->jobs, id, s->path, sizeof s->path)) {
            free(s);
            job_not_found(request, id);
            return;
        }
        lq_http_set_header(request, "Cache-Control", "no-cache");
        lq_http_respond_stream(request, 200, "text/event-stream", event_stream_read,
                               event_stream_free, s);
        return;
    }
    cJSON *events = id ? lq_jobs_events(api->jobs, id) : NULL;
    if (!events) {
        job_not_found(request, id);
        return;
    }
    lq_http_respond_json(request, 200, events);
    cJSON_Delete(events);
}
