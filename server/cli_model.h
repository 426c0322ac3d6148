/* What generate and eval share: a model, its tokenizer and a runtime on the chosen device,
 * opened from the command line's --model / --tokenizer / --device / --gpu-memory. */
#ifndef LQ_CLI_MODEL_H
#define LQ_CLI_MODEL_H

#include "core/forward.h"
#include "core/tokenizer.h"

struct lq_cli_model {
    struct lq_model *model;
    struct lq_tokenizer *tokenizer; /* NULL when not needed and not found */
    struct lq_backend *backend;
    struct lq_runtime *runtime;
};

/* The device options every model-running command takes. */
struct lq_cli_device {
    const char *device;  /* --device: cpu (NULL), cuda, cuda:N, auto */
    size_t memory_limit; /* --gpu-memory in bytes; 0: the GPU's free memory */
};

/* Parses --device / --gpu-memory into d when option is one of them: returns 1 (consumed),
 * 0 (not a device option) or 2 after printing a usage error for `command`. */
int lq_cli_device_option(const char *command, const char *name, const char *value,
                         struct lq_cli_device *d);
#define LQ_CLI_DEVICE_USAGE                                                                        \
    "  --device D         cpu (default), cuda, cuda:N or auto; without a usable GPU the CPU\n"     \
    "                     runs and a line on stderr says why\n"                                   \
    "  --gpu-memory SIZE  most GPU memory lqd may take (e.g. 40G; default: what is free)\n"

/* Loads model_path and the tokenizer: tokenizer_path if given, else the one in the model's
 * directory (or tokenizer.bin beside a llama2.c .bin). need_tokenizer = 0 makes a missing
 * tokenizer no error. The runtime is on device (NULL: the CPU); when a GPU was asked for, a
 * line on stderr names the device that runs. */
int lq_cli_model_open(const char *model_path, const char *tokenizer_path, int need_tokenizer,
                      const struct lq_cli_device *device, struct lq_cli_model *out,
                      struct lq_error *err);
void lq_cli_model_close(struct lq_cli_model *m);

#endif
