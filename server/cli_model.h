/* What generate and eval share: a model, its tokenizer and a runtime on the chosen device,
 * opened from the command line's --model / --tokenizer / --device / --gpu-memory, and an
 * optional LoRA adapter (--adapter) applied as the daemon applies it. */
#ifndef LQ_CLI_MODEL_H
#define LQ_CLI_MODEL_H

#include "core/forward.h"
#include "core/tokenizer.h"

struct lq_cli_model {
    struct lq_model *model;
    struct lq_tokenizer *tokenizer; /* NULL when not needed and not found */
    struct lq_backend *backend;
    struct lq_runtime *runtime;
    struct lq_adapter *adapter;                 /* --adapter, or NULL */
    struct lq_adapter_weights *adapter_weights; /* adapter prepared for runtime, or NULL */
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
    "                     runs and a line on stderr says why\n"                                    \
    "  --gpu-memory SIZE  most GPU memory lqd may take (e.g. 40G; default: what is free)\n"

/* Loads model_path and the tokenizer: tokenizer_path if given, else the one in the model's
 * directory (or tokenizer.bin beside a llama2.c .bin). need_tokenizer = 0 makes a missing
 * tokenizer no error. The runtime is on device (NULL: the CPU); when a GPU was asked for, a
 * line on stderr names the device that runs. */
int lq_cli_model_open(const char *model_path, const char *tokenizer_path, int need_tokenizer,
                      const struct lq_cli_device *device, struct lq_cli_model *out,
                      struct lq_error *err);
void lq_cli_model_close(struct lq_cli_model *m);

/* Loads the PEFT LoRA adapter directory dir (lq_adapter_load), checks it against m's model and
 * prepares it on m's runtime (lq_adapter_weights_create): the daemon's own steps for
 * POST /v1/adapters/load, so that a session on it (lq_cli_model_session) computes exactly
 * what "model:adapter" serves. Errors name dir: unreadable or corrupt files, or the first
 * mismatch with the model (layers, shapes, ranks, a replace-mode adapter on a dense model). */
int lq_cli_model_load_adapter(struct lq_cli_model *m, const char *dir, struct lq_error *err);
#define LQ_CLI_ADAPTER_USAGE                                                                       \
    "  --adapter DIR      a PEFT LoRA adapter directory (lqd finetune's output, or PEFT's):\n"     \
    "                     replace-mode adapters (LQ-LoRA) take the place of an LQ model's own\n"   \
    "                     L1, L2; add-mode ones (QLoRA-style, PEFT's) add to the model as it\n"    \
    "                     is. Applied as lqd serve applies \"model:adapter\", with the same\n"     \
    "                     results on the CPU\n"

/* A session on m's runtime (lq_session_create), running on m's adapter when one is loaded. */
int lq_cli_model_session(struct lq_cli_model *m, int context, int max_batch,
                         struct lq_session **out, struct lq_error *err);

#endif
