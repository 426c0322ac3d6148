#include "server/serve_config.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"
#include "server/cli.h"
#include "server/job_launcher.h"

const char lq_serve_usage[] =
    "usage: lqd serve [--model [NAME=]PATH]... [--host H] [--port P] [--state-dir D]\n"
    "                 [--api-key K | --api-key-file F] [--models-dir D]... [--config FILE] ...\n"
    "\n"
    "Serves models over HTTP: OpenAI-compatible /v1/completions and /v1/chat/completions\n"
    "(streaming included), /v1/models, model load/unload, /health, /ready, /metrics. The API\n"
    "is described in api/openapi.yaml. With no --model it serves the bundled stories260K.\n"
    "\n"
    "  --model [NAME=]PATH    a model to serve (HF or LQ directory, llama2.c .bin, GGUF); NAME\n"
    "                         defaults to the directory or file name (repeatable)\n"
    "  --tokenizer T          tokenizer for the --model(s) (default: found beside each)\n"
    "  --host H               address to bind (default 127.0.0.1: this machine only)\n"
    "  --port P               TCP port (default 8080; 0 picks a free one, written to\n"
    "                         STATE_DIR/serve.json)\n"
    "  --state-dir D          the daemon's own files (default $XDG_STATE_HOME/lqd or\n"
    "                         ~/.local/state/lqd)\n"
    "  --api-key K            require 'Authorization: Bearer K' on every route but /health\n"
    "                         (repeatable)\n"
    "  --api-key-file F       the same, keys read from F, one per line\n"
    "  --models-dir D         directories POST /v1/models/load may read (repeatable; default:\n"
    "                         the directories holding the --model paths)\n"
    "  --max-running N        sequences decoded together (default 16 on the CPU, 64 on a GPU)\n"
    "  --max-queued N         requests waiting; more get 429 with Retry-After (default 64)\n"
    "  --context N            positions per sequence (default: each model's maximum)\n"
    "  --max-choices N        prompts x n of one request, at most (default 64)\n"
    "  --max-jobs N           background jobs (POST /v1/jobs) running at once; the rest\n"
    "                         queue (default 1); records in STATE_DIR/jobs\n"
    "  --request-timeout S    seconds one generation may run (default 600; 0: no limit)\n"
    "  --grace-period S       on SIGTERM, seconds to finish requests before cancelling them\n"
    "                         (default 10)\n"
    "  --max-body BYTES       largest request body, e.g. 1048576 or 1M (default 1M)\n"
    "  --max-upload-size N    largest file upload (POST /v1/files, streamed to\n"
    "                         STATE_DIR/files), e.g. 64M; at most 1G (default 256M)\n"
    "  --max-connections N    open connections at most (default 256)\n"
    "  --device D             cpu (default), cuda, cuda:N or auto: where models run and jobs\n"
    "                         decompose; without a usable GPU the CPU runs and the log says why\n"
    "  --gpu-memory SIZE      most GPU memory the daemon may take, e.g. 40G (default: what is\n"
    "                         free); a model that does not fit is refused with what is held\n"
    "  --compress-launcher C  run compress jobs as 'C... lqd compress ...' child processes,\n"
    "                         e.g. \"mpirun -n 4 --hostfile hosts\" (split into words with the\n"
    "                         shell's quoting, no shell; default: in the daemon)\n"
    "  --log-format F         text or json (JSON lines), on stderr (default text)\n"
    "  --log-level L          debug, info, warn or error (default info)\n"
    "  --config FILE          settings from FILE: 'key = value' lines (# comments) or a JSON\n"
    "                         object, keys named as the flags (model may repeat / be a list)\n"
    "\n"
    "Every setting can also come from the environment as LQD_<NAME> (LQD_PORT, LQD_API_KEY,\n"
    "LQD_MODELS_DIR, LQD_CONFIG, ...; lists separated by commas). Flags override the\n"
    "environment, which overrides the config file.\n"
    "\n"
    "example: lqd serve --model models/stories260K-hf --port 8080 --api-key secret\n";

enum kind { KIND_STRING, KIND_LIST, KIND_INT, KIND_DOUBLE, KIND_SIZE };

struct setting {
    const char *name;
    enum kind kind;
    size_t offset, count_offset;
    double min, max;
};

#define FIELD(field) offsetof(struct lq_serve_config, field)
static const struct setting settings[] = {
    {"model", KIND_LIST, FIELD(models), FIELD(n_models), 0, 0},
    {"tokenizer", KIND_STRING, FIELD(tokenizer), 0, 0, 0},
    {"host", KIND_STRING, FIELD(host), 0, 0, 0},
    {"port", KIND_INT, FIELD(port), 0, 0, 65535},
    {"state-dir", KIND_STRING, FIELD(state_dir), 0, 0, 0},
    {"api-key", KIND_LIST, FIELD(api_keys), FIELD(n_api_keys), 0, 0},
    {"api-key-file", KIND_STRING, FIELD(api_key_file), 0, 0, 0},
    {"models-dir", KIND_LIST, FIELD(models_dirs), FIELD(n_models_dirs), 0, 0},
    {"max-running", KIND_INT, FIELD(max_running), 0, 1, 4096},
    {"max-queued", KIND_INT, FIELD(max_queued), 0, 1, 1 << 20},
    {"context", KIND_INT, FIELD(context), 0, 0, 1 << 24},
    {"max-choices", KIND_INT, FIELD(max_choices), 0, 1, 1024},
    {"max-connections", KIND_INT, FIELD(max_connections), 0, 1, 1 << 20},
    {"max-jobs", KIND_INT, FIELD(max_jobs), 0, 1, 64},
    {"request-timeout", KIND_DOUBLE, FIELD(request_timeout), 0, 0, 1e7},
    {"grace-period", KIND_DOUBLE, FIELD(grace_period), 0, 0, 86400},
    {"max-body", KIND_SIZE, FIELD(max_body), 0, 1024, 1 << 30},
    {"max-upload-size", KIND_SIZE, FIELD(max_upload_size), 0, 1024, 1 << 30},
    {"log-format", KIND_STRING, FIELD(log_format), 0, 0, 0},
    {"log-level", KIND_STRING, FIELD(log_level), 0, 0, 0},
    {"device", KIND_STRING, FIELD(device), 0, 0, 0},
    {"gpu-memory", KIND_STRING, FIELD(gpu_memory), 0, 0, 0},
    {"compress-launcher", KIND_STRING, FIELD(compress_launcher), 0, 0, 0},
};
#undef FIELD
#define N_SETTINGS (sizeof settings / sizeof settings[0])

enum layer { LAYER_FILE = 1, LAYER_ENV, LAYER_FLAG };

struct loader {
    struct lq_serve_config *config;
    int list_layer[N_SETTINGS]; /* the layer whose values a list holds */
    char *message;
    size_t size;
};

static const char *layer_name(enum layer layer) {
    return layer == LAYER_FLAG ? "option" : layer == LAYER_ENV ? "environment" : "config file";
}

static int fail(struct loader *l, enum layer layer, const char *name, const char *what) {
    snprintf(l->message, l->size, "%s '%s': %s", layer_name(layer), name, what);
    return 2;
}

/* "1048576", "64K", "1M", "1G". */
static int parse_size(const char *text, double min, double max, long *out) {
    char *end;
    double value = strtod(text, &end);
    if (end == text) return -1;
    if (*end == 'k' || *end == 'K')
        value *= 1024, end++;
    else if (*end == 'm' || *end == 'M')
        value *= 1048576, end++;
    else if (*end == 'g' || *end == 'G')
        value *= 1073741824, end++;
    if (*end || value < min || value > max || value != (double)(long)value) return -1;
    *out = (long)value;
    return 0;
}

static int apply(struct loader *l, enum layer layer, const char *name, const char *value) {
    size_t i = 0;
    while (i < N_SETTINGS && strcmp(settings[i].name, name) != 0) i++;
    if (i == N_SETTINGS) return fail(l, layer, name, "unknown setting");
    const struct setting *s = &settings[i];
    char *base = (char *)l->config;
    char what[160];
    long integer;
    double real;
    switch (s->kind) {
    case KIND_STRING: {
        char **field = (char **)(base + s->offset);
        free(*field);
        *field = strdup(value);
        return 0;
    }
    case KIND_LIST: {
        char **list = (char **)(base + s->offset);
        size_t *count = (size_t *)(base + s->count_offset);
        if (l->list_layer[i] != (int)layer) { /* a higher level replaces the list */
            for (size_t k = 0; k < *count; k++) free(list[k]);
            *count = 0;
            l->list_layer[i] = (int)layer;
        }
        if (*count == LQ_SERVE_MAX_LIST)
            return fail(l, layer, name, "too many values (16 at most)");
        list[(*count)++] = strdup(value);
        return 0;
    }
    case KIND_INT:
        if (lq_cli_parse_int(value, (long)s->min, (long)s->max, &integer)) {
            snprintf(what, sizeof what, "'%s' is not an integer in [%.0f, %.0f]", value, s->min,
                     s->max);
            return fail(l, layer, name, what);
        }
        *(int *)(base + s->offset) = (int)integer;
        return 0;
    case KIND_DOUBLE:
        if (lq_cli_parse_double(value, s->min, s->max, &real)) {
            snprintf(what, sizeof what, "'%s' is not a number in [%g, %g]", value, s->min, s->max);
            return fail(l, layer, name, what);
        }
        *(double *)(base + s->offset) = real;
        return 0;
    case KIND_SIZE:
        if (parse_size(value, s->min, s->max, &integer)) {
            snprintf(what, sizeof what, "'%s' is not a size in bytes (1K to 1G)", value);
            return fail(l, layer, name, what);
        }
        *(long *)(base + s->offset) = integer;
        return 0;
    }
    return 0;
}

/* Applies a comma-separated list one value at a time (plain values go through whole). */
static int apply_split(struct loader *l, enum layer layer, const char *name, const char *value) {
    size_t i = 0;
    while (i < N_SETTINGS && strcmp(settings[i].name, name) != 0) i++;
    if (i == N_SETTINGS || settings[i].kind != KIND_LIST) return apply(l, layer, name, value);
    char *copy = strdup(value), *save = NULL;
    int rc = 0;
    for (char *item = strtok_r(copy, ",", &save); item && !rc; item = strtok_r(NULL, ",", &save))
        if (*item) rc = apply(l, layer, name, item);
    free(copy);
    return rc;
}

static char *trim(char *text) {
    while (isspace((unsigned char)*text)) text++;
    size_t length = strlen(text);
    while (length && isspace((unsigned char)text[length - 1])) text[--length] = '\0';
    return text;
}

static void normalize_key(char *key) {
    for (char *p = key; *p; p++)
        if (*p == '_') *p = '-';
}

static int load_json(struct loader *l, const char *text, size_t length) {
    cJSON *root = lq_json_parse(text, length);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return fail(l, LAYER_FILE, l->config->config_file, "not a JSON object");
    }
    int rc = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root) {
        char key[64], value[64];
        snprintf(key, sizeof key, "%s", item->string);
        normalize_key(key);
        if (cJSON_IsArray(item)) {
            const cJSON *element;
            cJSON_ArrayForEach(element, item) {
                if (!cJSON_IsString(element)) rc = fail(l, LAYER_FILE, key, "lists hold strings");
                if (!rc) rc = apply(l, LAYER_FILE, key, element->valuestring);
            }
        } else if (cJSON_IsString(item)) {
            rc = apply(l, LAYER_FILE, key, item->valuestring);
        } else if (cJSON_IsNumber(item)) {
            snprintf(value, sizeof value, "%.17g", item->valuedouble);
            rc = apply(l, LAYER_FILE, key, value);
        } else {
            rc = fail(l, LAYER_FILE, key, "expected a string, a number or a list of strings");
        }
        if (rc) break;
    }
    cJSON_Delete(root);
    return rc;
}

static int load_file(struct loader *l, const char *path) {
    char *text = NULL;
    size_t length = 0;
    struct lq_error err = {0};
    if (lq_file_read_all(path, 1 << 20, &text, &length, &err)) {
        snprintf(l->message, l->size, "--config: %s", err.message);
        return 2;
    }
    char *start = trim(text);
    int rc = 0;
    if (*start == '{') {
        rc = load_json(l, start, strlen(start));
    } else {
        char *save = NULL;
        int line_number = 0;
        for (char *line = strtok_r(text, "\n", &save); line && !rc;
             line = strtok_r(NULL, "\n", &save)) {
            line_number++;
            char *hash = strchr(line, '#');
            if (hash) *hash = '\0';
            line = trim(line);
            if (!*line) continue;
            char *equals = strchr(line, '=');
            if (!equals) {
                snprintf(l->message, l->size, "%s: a line without '=': '%s'", path, line);
                rc = 2;
                break;
            }
            *equals = '\0';
            char *key = trim(line), *value = trim(equals + 1);
            size_t value_length = strlen(value);
            if (value_length >= 2 && value[0] == '"' && value[value_length - 1] == '"')
                value[value_length - 1] = '\0', value++;
            normalize_key(key);
            rc = apply(l, LAYER_FILE, key, value);
        }
    }
    free(text);
    return rc;
}

static void set_defaults(struct lq_serve_config *c) {
    memset(c, 0, sizeof *c);
    c->host = strdup("127.0.0.1");
    c->port = 8080;
    c->max_running = 0; /* by device, in cmd_serve.c */
    c->max_queued = 64;
    c->max_choices = 64;
    c->max_connections = 256;
    c->max_jobs = 1;
    c->request_timeout = 600;
    c->grace_period = 10;
    c->max_body = 1 << 20;
    c->max_upload_size = 256L << 20;
    c->log_format = strdup("text");
    c->log_level = strdup("info");
}

int lq_serve_config_load(int argc, char **argv, struct lq_serve_config *out, char *message,
                         size_t size) {
    set_defaults(out);
    struct loader l = {.config = out, .message = message, .size = size};
    /* Flags are read first (to find --config) and applied last. */
    struct option options[N_SETTINGS + 3];
    for (size_t i = 0; i < N_SETTINGS; i++)
        options[i] = (struct option){settings[i].name, required_argument, NULL, 256 + (int)i};
    options[N_SETTINGS] = (struct option){"config", required_argument, NULL, 'c'};
    options[N_SETTINGS + 1] = (struct option){"help", no_argument, NULL, 'h'};
    options[N_SETTINGS + 2] = (struct option){NULL, 0, NULL, 0};
    const char **flag_names = calloc((size_t)argc + 1, sizeof *flag_names);
    const char **flag_values = calloc((size_t)argc + 1, sizeof *flag_values);
    size_t n_flags = 0;
    const char *config_path = getenv("LQD_CONFIG");
    int rc = 0, option;
    optind = 1;
    opterr = 0;
    while (!rc && flag_names && flag_values &&
           (option = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        if (option == 'h') {
            fputs(lq_serve_usage, stdout);
            rc = 1;
        } else if (option == 'c') {
            config_path = optarg;
        } else if (option >= 256 && option < 256 + (int)N_SETTINGS) {
            flag_names[n_flags] = settings[option - 256].name;
            flag_values[n_flags++] = optarg;
        } else {
            snprintf(message, size, "unknown or incomplete option '%s'", argv[optind - 1]);
            rc = 2;
        }
    }
    if (!rc && (!flag_names || !flag_values)) snprintf(message, size, "out of memory"), rc = 2;
    if (!rc && optind < argc)
        snprintf(message, size, "unexpected argument '%s'", argv[optind]), rc = 2;
    if (!rc && config_path && *config_path) {
        out->config_file = strdup(config_path);
        rc = load_file(&l, config_path);
    }
    for (size_t i = 0; !rc && i < N_SETTINGS; i++) {
        char variable[64] = "LQD_";
        size_t at = 4;
        for (const char *p = settings[i].name; *p && at < sizeof variable - 1; p++)
            variable[at++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
        variable[at] = '\0';
        const char *value = getenv(variable);
        if (value && *value) rc = apply_split(&l, LAYER_ENV, settings[i].name, value);
    }
    for (size_t i = 0; !rc && i < n_flags; i++)
        rc = apply(&l, LAYER_FLAG, flag_names[i], flag_values[i]);
    free(flag_names);
    free(flag_values);
    if (!rc && strcmp(out->log_format, "text") != 0 && strcmp(out->log_format, "json") != 0)
        snprintf(message, size, "log-format '%s': expected text or json", out->log_format), rc = 2;
    if (!rc && out->compress_launcher) { /* refused now, not at the first job */
        char **words = NULL;
        size_t count = 0;
        struct lq_error err = {0};
        if (lq_launcher_split(out->compress_launcher, &words, &count, &err)) {
            snprintf(message, size, "compress-launcher '%.200s': %s", out->compress_launcher,
                     err.message);
            rc = 2;
        }
        free(words);
    }
    if (rc) lq_serve_config_free(out);
    return rc;
}

void lq_serve_config_free(struct lq_serve_config *c) {
    for (size_t i = 0; i < c->n_models; i++) free(c->models[i]);
    for (size_t i = 0; i < c->n_api_keys; i++) free(c->api_keys[i]);
    for (size_t i = 0; i < c->n_models_dirs; i++) free(c->models_dirs[i]);
    free(c->tokenizer);
    free(c->host);
    free(c->state_dir);
    free(c->api_key_file);
    free(c->log_format);
    free(c->log_level);
    free(c->device);
    free(c->gpu_memory);
    free(c->compress_launcher);
    free(c->config_file);
    memset(c, 0, sizeof *c);
}
