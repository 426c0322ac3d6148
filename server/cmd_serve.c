/* lqd serve: the daemon. Wires the registry (models), the scheduler (continuous batching),
 * the HTTP server and the API together, then runs a libuv loop on the main thread that waits
 * for SIGTERM/SIGINT and drains: stop accepting, let requests in flight finish within the
 * grace period, cancel what is left, exit 0. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "core/error_table.h"
#include "core/file_util.h"
#include "kernels/backend.h"
#include "kernels/backend_select.h"
#include "server/api.h"
#include "server/api_request.h"
#include "server/cli.h"
#include "server/http_server.h"
#include "server/job_launcher.h"
#include "server/log.h"
#include "server/serve_config.h"
/* Last: uv.h brings termios.h, whose B0 macro would clash with core/nf.h's field. */
#include <uv.h>

#ifndef LQD_VERSION
#define LQD_VERSION "dev"
#endif

static int usage_error(const char *message) {
    fprintf(stderr, "lqd serve: %s\n(see 'lqd serve --help')\n", message);
    return 2;
}

/* ---------- the bundled model and the state directory ---------- */

/* models/stories260K-hf, looked for where a checkout or an install keeps it. */
static int find_bundled_model(char *out, size_t size) {
    char exe[PATH_MAX] = "";
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) *slash = '\0';
    }
    const char *env = getenv("LQD_DATA_DIR");
    char candidates[7][PATH_MAX + 64];
    size_t count = 0;
    if (env) snprintf(candidates[count++], sizeof candidates[0], "%s/models/stories260K-hf", env);
#ifdef LQD_MODELS_DIR /* the build's source tree (meson sets it), for builds outside it */
    snprintf(candidates[count++], sizeof candidates[0], "%s/stories260K-hf", LQD_MODELS_DIR);
#endif
    snprintf(candidates[count++], sizeof candidates[0], "models/stories260K-hf");
    if (exe[0]) {
        static const char *const relative[] = {"../models", "../../models", "../share/lqd/models",
                                               "../../share/lqd/models"};
        for (size_t i = 0; i < 4; i++)
            snprintf(candidates[count++], sizeof candidates[0], "%s/%s/stories260K-hf", exe,
                     relative[i]);
    }
    for (size_t i = 0; i < count; i++)
        if (lq_path_is_dir(candidates[i]) && realpath(candidates[i], out) && strlen(out) < size)
            return 1;
    return 0;
}

static int make_dirs(const char *path) {
    char copy[PATH_MAX];
    snprintf(copy, sizeof copy, "%s", path);
    for (char *p = copy + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            if (mkdir(copy, 0700) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(copy, 0700) && errno != EEXIST ? -1 : 0;
}

static char *default_state_dir(void) {
    char path[PATH_MAX];
    const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    if (xdg && *xdg)
        snprintf(path, sizeof path, "%s/lqd", xdg);
    else if (home && *home)
        snprintf(path, sizeof path, "%s/.local/state/lqd", home);
    else
        snprintf(path, sizeof path, "lqd-state");
    return strdup(path);
}

/* ---------- models and keys from the configuration ---------- */

/* "NAME=PATH" or "PATH" -> name and path. */
static void split_model(const char *spec, char *name, size_t name_size, char *path,
                        size_t path_size) {
    const char *equals = strchr(spec, '=');
    if (equals && (size_t)(equals - spec) < name_size) {
        snprintf(name, name_size, "%.*s", (int)(equals - spec), spec);
        if (lq_model_name_valid(name)) {
            snprintf(path, path_size, "%s", equals + 1);
            return;
        }
    }
    snprintf(path, path_size, "%s", spec);
    char copy[PATH_MAX];
    snprintf(copy, sizeof copy, "%s", spec);
    size_t length = strlen(copy);
    while (length > 1 && copy[length - 1] == '/') copy[--length] = '\0';
    const char *base = strrchr(copy, '/') ? strrchr(copy, '/') + 1 : copy;
    snprintf(name, name_size, "%s", base);
    char *dot = strrchr(name, '.');
    if (dot && dot != name && (strcmp(dot, ".bin") == 0 || strcmp(dot, ".safetensors") == 0))
        *dot = '\0';
    for (char *p = name; *p; p++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-", *p))
            *p = '_';
}

static int read_key_file(struct lq_serve_config *config, struct lq_error *err) {
    char *text = NULL;
    size_t length = 0;
    if (lq_file_read_all(config->api_key_file, 1 << 16, &text, &length, err))
        return lq_error_prefix(err, "--api-key-file");
    char *save = NULL;
    for (char *line = strtok_r(text, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        while (*line == ' ' || *line == '\t') line++;
        size_t n = strlen(line);
        while (n && (line[n - 1] == ' ' || line[n - 1] == '\t')) line[--n] = '\0';
        if (!n || line[0] == '#') continue;
        if (config->n_api_keys == LQ_SERVE_MAX_LIST) break;
        config->api_keys[config->n_api_keys++] = strdup(line);
    }
    free(text);
    if (config->n_api_keys == 0)
        return lq_error_set(err, LQ_EINVAL, "--api-key-file %s holds no key", config->api_key_file);
    return LQ_OK;
}

/* ---------- the loop: signals and the drain ---------- */

struct daemon {
    struct lq_serve_config config;
    struct lq_api api;
    struct lq_http_server *http;
    uv_loop_t loop;
    uv_signal_t sigterm, sigint;
    uv_timer_t timer;
    int draining;
    double drain_deadline;
    char state_file[PATH_MAX + 32];
};

static void on_timer(uv_timer_t *timer) {
    struct daemon *d = timer->data;
    if (!d->draining) return;
    int active = d->http ? lq_http_server_active(d->http) : 0;
    if (active == 0) {
        lq_log(LQ_LOG_INFO, "drained", LQ_LOG_STR("detail", "every request finished"));
        uv_stop(&d->loop);
    } else if (lq_http_now() >= d->drain_deadline) {
        lq_log(LQ_LOG_WARN, "grace period over", LQ_LOG_INT("requests_cancelled", active));
        uv_stop(&d->loop);
    }
}

static void on_signal(uv_signal_t *handle, int signal_number) {
    struct daemon *d = handle->data;
    const char *name = signal_number == SIGTERM ? "SIGTERM" : "SIGINT";
    if (d->draining) { /* a second signal: stop now */
        lq_log(LQ_LOG_WARN, "stopping now", LQ_LOG_STR("signal", name));
        uv_stop(&d->loop);
        return;
    }
    d->draining = 1;
    atomic_store(&d->api.draining, 1);
    d->drain_deadline = lq_http_now() + d->config.grace_period;
    lq_log(LQ_LOG_INFO, "draining", LQ_LOG_STR("signal", name),
           LQ_LOG_NUM("grace_seconds", d->config.grace_period),
           LQ_LOG_INT("requests", d->http ? lq_http_server_active(d->http) : 0));
    if (d->http) lq_http_server_quiesce(d->http);
    uv_timer_start(&d->timer, on_timer, 0, 50);
}

static int write_state(struct daemon *d, const char *state_dir, struct lq_error *err) {
    snprintf(d->state_file, sizeof d->state_file, "%s/serve.json", state_dir);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "pid", (double)getpid());
    cJSON_AddStringToObject(root, "host", d->config.host);
    cJSON_AddNumberToObject(root, "port", lq_http_server_port(d->http));
    cJSON_AddNumberToObject(root, "started", (double)d->api.started);
    cJSON_AddStringToObject(root, "version", LQD_VERSION);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    int rc = lq_file_write_atomic(d->state_file, text, strlen(text), err);
    cJSON_free(text);
    return rc;
}

/* ---------- start, serve, stop ---------- */

/* ---------- adapters from finetune jobs ---------- */

/* A finetune job finished (server/job_finetune.c): "activate" swaps the adapter into serving
 * under its name; without it the adapter is published only when no adapter of that name is
 * serving yet, so a job never silently changes what clients of an existing name get. */
static int on_adapter_ready(void *context, const char *model, const char *adapter, const char *dir,
                            int activate, struct lq_error *err) {
    struct lq_registry *registry = context;
    struct lq_served_adapter *serving = lq_registry_adapter_get(registry, model, adapter);
    if (serving) {
        lq_served_adapter_release(serving);
        if (!activate) {
            lq_log(LQ_LOG_INFO, "adapter written, not activated", LQ_LOG_STR("model", model),
                   LQ_LOG_STR("adapter", adapter), LQ_LOG_STR("path", dir));
            return LQ_OK;
        }
    }
    int rc = lq_registry_adapter_load(registry, model, adapter, dir, err);
    if (!rc)
        lq_log(LQ_LOG_INFO, "adapter loaded", LQ_LOG_STR("model", model),
               LQ_LOG_STR("adapter", adapter), LQ_LOG_STR("path", dir));
    return rc;
}

/* Serves again what finetune jobs left in STATE_DIR/adapters/<model>/<adapter> for the models
 * being served. One that no longer loads (its model changed) is skipped with a warning. */
static void load_saved_adapters(struct daemon *d) {
    char root[PATH_MAX];
    snprintf(root, sizeof root, "%.2000s/adapters", d->config.state_dir);
    DIR *models = opendir(root);
    if (!models) return;
    struct dirent *m;
    while ((m = readdir(models))) {
        if (m->d_name[0] == '.') continue;
        struct lq_served_model *served = lq_registry_get(d->api.registry, m->d_name);
        if (!served) continue;
        lq_served_model_release(served);
        char model_dir[PATH_MAX];
        snprintf(model_dir, sizeof model_dir, "%.2000s/%.200s", root, m->d_name);
        DIR *adapters = opendir(model_dir);
        struct dirent *a;
        while (adapters && (a = readdir(adapters))) {
            if (a->d_name[0] == '.' || strchr(a->d_name, '~')) continue;
            char dir[PATH_MAX];
            snprintf(dir, sizeof dir, "%.3000s/%.200s", model_dir, a->d_name);
            if (!lq_path_is_dir(dir)) continue;
            struct lq_error err = {0};
            if (lq_registry_adapter_load(d->api.registry, m->d_name, a->d_name, dir, &err))
                lq_log(LQ_LOG_WARN, "saved adapter not loaded", LQ_LOG_STR("path", dir),
                       LQ_LOG_STR("error", err.message));
            else
                lq_log(LQ_LOG_INFO, "adapter loaded", LQ_LOG_STR("model", m->d_name),
                       LQ_LOG_STR("adapter", a->d_name), LQ_LOG_STR("path", dir));
        }
        if (adapters) closedir(adapters);
    }
    closedir(models);
}

/* The launcher compress jobs run through (validated with the settings): a program that is
 * not there yet is a warning, not a refusal; the job that needs it fails with the reason. */
static void log_launcher(const char *launcher) {
    char **words = NULL, path[PATH_MAX];
    size_t count = 0;
    struct lq_error err = {0};
    if (lq_launcher_split(launcher, &words, &count, &err) == LQ_OK &&
        lq_launcher_resolve(words[0], path, sizeof path, &err) == LQ_OK)
        lq_log(LQ_LOG_INFO, "compress jobs through a launcher", LQ_LOG_STR("launcher", launcher),
               LQ_LOG_STR("program", path));
    else
        lq_log(LQ_LOG_WARN, "compress launcher not usable now", LQ_LOG_STR("launcher", launcher),
               LQ_LOG_STR("error", err.message));
    free(words);
}

static int start(struct daemon *d, struct lq_backend **backend, struct lq_error *err) {
    struct lq_serve_config *c = &d->config;
    if (c->api_key_file && read_key_file(c, err)) return -1;
    if (!c->state_dir) c->state_dir = default_state_dir();
    if (!c->state_dir || make_dirs(c->state_dir) || access(c->state_dir, W_OK))
        return lq_error_set(err, LQ_EIO, "cannot create or write the state directory %s: %s",
                            c->state_dir ? c->state_dir : "?", strerror(errno));
    if (c->n_models == 0) {
        char bundled[PATH_MAX];
        if (!find_bundled_model(bundled, sizeof bundled))
            return lq_error_set(err, LQ_ENOTFOUND,
                                "no --model given and the bundled models/stories260K-hf is not "
                                "found (set LQD_DATA_DIR to the directory holding models/)");
        size_t length = strlen(bundled) + 32;
        c->models[0] = malloc(length);
        snprintf(c->models[0], length, "stories260K=%s", bundled);
        c->n_models = 1;
        /* The same model shipped LQ-compressed (models/stories260K-lq), served second so that
         * the first listed model stays the reference fp32 one. */
        char compressed[PATH_MAX];
        snprintf(compressed, sizeof compressed, "%.*s-lq", (int)(strlen(bundled) - 3), bundled);
        if (lq_path_is_dir(compressed)) {
            c->models[1] = malloc(strlen(compressed) + 32);
            sprintf(c->models[1], "stories260K-lq=%s", compressed);
            c->n_models = 2;
        }
    }
    /* Directories a client may load from: --models-dir, else those of the startup models. */
    struct lq_api_config *api_config = &d->api.config;
    api_config->model_roots = calloc(LQ_SERVE_MAX_LIST * 2, sizeof(char *));
    if (!api_config->model_roots) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    for (size_t i = 0; i < (c->n_models_dirs ? c->n_models_dirs : c->n_models); i++) {
        char name[72], path[PATH_MAX], real[PATH_MAX];
        if (c->n_models_dirs) {
            snprintf(path, sizeof path, "%s", c->models_dirs[i]);
        } else {
            split_model(c->models[i], name, sizeof name, path, sizeof path);
            char *slash = strrchr(path, '/');
            while (slash && slash[1] == '\0' && slash != path)
                *slash = '\0', slash = strrchr(path, '/');
            if (slash && slash != path)
                *slash = '\0';
            else
                snprintf(path, sizeof path, "%s", slash ? "/" : ".");
        }
        if (!realpath(path, real) || !lq_path_is_dir(real)) {
            if (c->n_models_dirs)
                return lq_error_set(err, LQ_ENOTFOUND, "--models-dir %s is not a directory",
                                    c->models_dirs[i]);
            continue;
        }
        api_config->model_roots[api_config->n_model_roots++] = strdup(real);
    }
    /* Adapters (POST /v1/adapters/load) also load from STATE_DIR/adapters, where finetune
     * jobs leave them. */
    char adapters[PATH_MAX + 16], adapters_real[PATH_MAX];
    snprintf(adapters, sizeof adapters, "%s/adapters", c->state_dir);
    if (make_dirs(adapters) == 0 && realpath(adapters, adapters_real))
        api_config->adapters_dir = strdup(adapters_real);
    size_t gpu_memory = 0;
    if (c->gpu_memory && (lq_parse_memory_size(c->gpu_memory, &gpu_memory) || gpu_memory == 0))
        return lq_error_set(err, LQ_EINVAL, "--gpu-memory '%s': expected a size such as 40G",
                            c->gpu_memory);
    char notice[LQ_BACKEND_NOTICE_SIZE];
    if (lq_backend_open(c->device, gpu_memory, backend, notice, err)) return -1;
    lq_log(c->device && strcmp(c->device, "cpu") != 0 && strcmp((*backend)->ops->name, "cpu") == 0
               ? LQ_LOG_WARN
               : LQ_LOG_INFO,
           "compute device", LQ_LOG_STR("backend", (*backend)->ops->name),
           LQ_LOG_STR("detail", notice));
    if (lq_registry_create(*backend, &d->api.registry, err)) return -1;
    for (size_t i = 0; i < c->n_models; i++) {
        char name[72], path[PATH_MAX];
        split_model(c->models[i], name, sizeof name, path, sizeof path);
        if (!lq_model_name_valid(name))
            return lq_error_set(err, LQ_EINVAL,
                                "--model %s: cannot make a model name of it; "
                                "write NAME=PATH",
                                c->models[i]);
        double started = lq_http_now();
        if (lq_registry_load(d->api.registry, name, path, c->tokenizer, err)) return -1;
        /* The chat format, and the system message its template inserts ("" when none). */
        struct lq_served_model *loaded = lq_registry_get(d->api.registry, name);
        lq_log(
            LQ_LOG_INFO, "model loaded", LQ_LOG_STR("name", name), LQ_LOG_STR("path", path),
            LQ_LOG_NUM("seconds", lq_http_now() - started),
            LQ_LOG_STR("chat_format",
                       loaded ? lq_chat_format_name(loaded->chat_style.format) : NULL),
            LQ_LOG_STR("chat_default_system", loaded ? loaded->chat_style.default_system : NULL));
        lq_served_model_release(loaded);
    }
    if (lq_metrics_create(&d->api.metrics)) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    /* Unset (0): 16 on the CPU, 64 on a GPU, whose decode step reads the weights once for the
     * whole batch (on an H100, batch 64 gave 1.8x batch 32's tokens/s, README "The GPU"), and
     * where a request that does not fit the device's memory waits in the queue. */
    scheduler_options.max_running = c->max_running > 0                          ? c->max_running
                                    : strcmp((*backend)->ops->name, "cpu") == 0 ? 16
                                                                                : 64;
    scheduler_options.max_queued = c->max_queued;
    scheduler_options.context = c->context;
    if (lq_scheduler_create(&scheduler_options, &d->api.scheduler, err)) return -1;
    lq_log(LQ_LOG_INFO, "scheduler", LQ_LOG_INT("max_running", scheduler_options.max_running),
           LQ_LOG_INT("max_queued", scheduler_options.max_queued));
    /* Jobs found in the state directory (queued, or running when the last daemon died) start
     * again now. */
    /* The error-table cache: the user's ($LQD_CACHE_DIR, ~/.cache/lqd), shared with the CLI,
     * or the state directory's when the environment names none. */
    static char cache_dir[PATH_MAX];
    if (lq_error_table_cache_dir_default(cache_dir, sizeof cache_dir, NULL) != LQ_OK)
        snprintf(cache_dir, sizeof cache_dir, "%s/cache", c->state_dir);
    struct lq_jobs_options jobs_options = {.state_dir = c->state_dir,
                                           .max_jobs = c->max_jobs,
                                           .cache_dir = cache_dir,
                                           .registry = d->api.registry,
                                           .device = *backend,
                                           .adapter_ready = on_adapter_ready,
                                           .adapter_context = d->api.registry,
                                           .compress_launcher = c->compress_launcher};
    if (c->compress_launcher) log_launcher(c->compress_launcher);
    load_saved_adapters(d);
    if (lq_jobs_create(&jobs_options, &d->api.jobs, err)) return -1;
    api_config->context = c->context;
    api_config->request_timeout = c->request_timeout;
    api_config->max_choices = c->max_choices;
    api_config->version = LQD_VERSION;
    /* Uploaded files (POST /v1/files) live in STATE_DIR/files; uploads stream into it. */
    if (lq_files_open(c->state_dir, &d->api.files, err)) return -1;
    struct lq_http_server_options http = {
        .host = c->host,
        .port = c->port,
        .api_keys = (const char *const *)c->api_keys,
        .n_api_keys = c->n_api_keys,
        .max_body = (size_t)c->max_body,
        .upload_dir = lq_files_dir(d->api.files),
        .max_upload = (size_t)c->max_upload_size,
        .max_connections = (unsigned)c->max_connections,
        .idle_timeout = 120,
        .metrics = d->api.metrics,
        .app = &d->api,
    };
    if (lq_http_server_start(&http, &d->http, err)) return -1;
    return write_state(d, c->state_dir, err);
}

int lq_cli_serve(int argc, char **argv) {
#if defined(__GLIBC__)
    /* Large buffers (each request's KV cache and activations) always from mmap: glibc otherwise
     * raises its mmap threshold after the first frees, serves them from the heap and zeroes
     * whole KV caches there, and the daemon sat ~120 MB above idle under load. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
#endif
    struct daemon *d = calloc(1, sizeof *d);
    if (!d) return 1;
    char message[512];
    int rc = lq_serve_config_load(argc, argv, &d->config, message, sizeof message);
    if (rc) {
        free(d);
        return rc == 1 ? 0 : usage_error(message);
    }
    struct lq_serve_config *c = &d->config;
    int level = lq_log_level_parse(c->log_level);
    if (level < 0) {
        lq_serve_config_free(c);
        free(d);
        return usage_error("--log-level: expected debug, info, warn or error");
    }
    lq_log_configure(strcmp(c->log_format, "json") == 0 ? LQ_LOG_JSON : LQ_LOG_TEXT,
                     (enum lq_log_level)level);
    signal(SIGPIPE, SIG_IGN); /* a client gone mid-write is an error code, not a death */
    /* Signals are caught from the start, so a SIGTERM while models load drains at once. */
    uv_loop_init(&d->loop);
    uv_signal_init(&d->loop, &d->sigterm);
    uv_signal_init(&d->loop, &d->sigint);
    uv_timer_init(&d->loop, &d->timer);
    d->sigterm.data = d->sigint.data = d->timer.data = d;
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    uv_signal_start(&d->sigint, on_signal, SIGINT);

    struct lq_backend *backend = NULL;
    struct lq_error err = {0};
    int status = 0;
    if (lq_api_init(&d->api)) {
        lq_error_set(&err, LQ_ENOMEM, "out of memory");
        status = 1;
    } else if (start(d, &backend, &err)) {
        lq_log(LQ_LOG_ERROR, "cannot start", LQ_LOG_STR("error", err.message));
        fprintf(stderr, "lqd serve: %s\n", err.message);
        status = 1;
    } else {
        lq_log(LQ_LOG_INFO, "listening", LQ_LOG_STR("host", c->host),
               LQ_LOG_INT("port", lq_http_server_port(d->http)),
               LQ_LOG_STR("auth", c->n_api_keys ? "bearer" : "none"),
               LQ_LOG_STR("state_dir", c->state_dir), LQ_LOG_STR("version", LQD_VERSION));
        uv_run(&d->loop, UV_RUN_DEFAULT);
    }
    /* Stop: refuse new submissions, cancel what runs (each on_finish comes), let the streams
     * write their last chunks, then close every connection. */
    lq_api_close_scheduler(&d->api);
    /* Jobs stop at their next progress report and stay queued for the next start; the table
     * lives on until the HTTP threads are gone. */
    if (d->api.jobs) lq_jobs_stop(d->api.jobs);
    if (d->api.scheduler) lq_scheduler_free(d->api.scheduler);
    for (int i = 0; d->http && i < 100 && lq_http_server_active(d->http) > 0; i++) usleep(10000);
    lq_http_server_stop(d->http);
    lq_files_free(d->api.files);
    lq_jobs_free(d->api.jobs);
    if (status == 0 && d->state_file[0]) unlink(d->state_file);
    if (d->api.registry) lq_registry_free(d->api.registry);
    if (backend) backend->ops->destroy(backend);
    lq_metrics_free(d->api.metrics);
    for (size_t i = 0; i < d->api.config.n_model_roots; i++) free(d->api.config.model_roots[i]);
    free(d->api.config.model_roots);
    free(d->api.config.adapters_dir);
    lq_api_destroy(&d->api);
    uv_close((uv_handle_t *)&d->sigterm, NULL);
    uv_close((uv_handle_t *)&d->sigint, NULL);
    uv_close((uv_handle_t *)&d->timer, NULL);
    uv_run(&d->loop, UV_RUN_NOWAIT);
    uv_loop_close(&d->loop);
    if (status == 0) lq_log(LQ_LOG_INFO, "stopped", LQ_LOG_INT("exit", 0));
    lq_serve_config_free(c);
    free(d);
    return status;
}
