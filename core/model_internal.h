/* Shared by the model loaders (model_load.c, model_gguf.c); not part of the public API. */
#ifndef LQ_MODEL_INTERNAL_H
#define LQ_MODEL_INTERNAL_H

#include "core/model.h"

/* The [rows, cols] of a layer's linear matrix under config (HF layout, W[out, in]). */
void lq_model_linear_shape(const struct lq_model_config *config, enum lq_linear_kind kind,
                           int *rows, int *cols);
/* Moves the rows of a Q or K matrix from Meta's interleaved RoPE pairs (2i, 2i+1) to HF's
 * rotate-half pairs (i, i + head_dim/2), per head: row h*hd + 2i + j goes to h*hd + j*hd/2 + i.
 * meta and hf must not overlap. */
void lq_model_rope_rows_to_hf(const float *meta, float *hf, int heads, int head_dim, int cols);
/* Fills m (config, weights; not m->path) from a llama.cpp GGUF file (core/model_gguf.c). */
int lq_model_load_gguf(const char *path, struct lq_model *m, struct lq_error *err);
/* True when path is a regular file starting with the GGUF magic. */
int lq_model_is_gguf(const char *path);

#endif
