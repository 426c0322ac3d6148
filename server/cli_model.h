/* What generate and eval share: a model, its tokenizer and a CPU runtime, opened from the
 * command line's --model / --tokenizer. */
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

/* Loads model_path and the tokenizer: tokenizer_path if given, else the one in the model's
 * directory (or tokenizer.bin beside a llama2.c .bin). need_tokenizer = 0 makes a missing
 * tokenizer no error. */
int lq_cli_model_open(const char *model_path, const char *tokenizer_path, int need_tokenizer,
                      struct lq_cli_model *out, struct lq_error *err);
void lq_cli_model_close(struct lq_cli_model *m);

#endif
