/* `lqd serve`'s settings, from (lowest precedence first) defaults, a config file, LQD_*
 * environment variables and command-line flags. Every setting has the same name everywhere:
 * the flag --max-queued, the file key max-queued (or max_queued), the variable LQD_MAX_QUEUED.
 * List settings (model, models-dir, api-key) given at one level replace the lower levels'. */
#ifndef LQ_SERVE_CONFIG_H
#define LQ_SERVE_CONFIG_H

#include <stddef.h>

#define LQ_SERVE_MAX_LIST 16

struct lq_serve_config {
    char *models[LQ_SERVE_MAX_LIST]; /* "PATH" or "NAME=PATH" */
    size_t n_models;
    char *tokenizer;
    char *host;
    int port;
    char *state_dir;
    char *api_keys[LQ_SERVE_MAX_LIST];
    size_t n_api_keys;
    char *api_key_file;
    char *models_dirs[LQ_SERVE_MAX_LIST];
    size_t n_models_dirs;
    int max_running, max_queued, context, max_choices, max_connections;
    int max_jobs; /* background jobs running at once */
    double request_timeout, grace_period;
    long max_body;
    long max_upload_size; /* multipart uploads (POST /v1/files), bytes */
    char *log_format, *log_level;
    char *device;            /* cpu (NULL), cuda, cuda:N, auto */
    char *gpu_memory;        /* a size such as "40G"; NULL: the GPU's free memory */
    char *compress_launcher; /* "mpirun -n 4 ...": compress jobs through it; NULL: in-process */
    char *config_file;       /* where the file settings came from, or NULL */
};

extern const char lq_serve_usage[];

/* Reads argv (from "serve" on), the environment and the config file into out. Returns 0, 1
 * when --help was printed (exit 0), or 2 with message set for a usage error. */
int lq_serve_config_load(int argc, char **argv, struct lq_serve_config *out, char *message,
                         size_t size);
void lq_serve_config_free(struct lq_serve_config *config);

#endif
