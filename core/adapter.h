/* LoRA adapters in PEFT's layout: a directory with adapter_config.json and
 * adapter_model.safetensors. For every adapted linear P ("model.layers.3.mlp.up_proj") the
 * file holds "base_model.model.P.lora_A.weight" = L2 [rank, cols] and
 * "base_model.model.P.lora_B.weight" = L1 [rows, rank], float32; adapter_config.json says
 * peft_type "LORA", r, lora_alpha = r (so PEFT's scaling alpha/r is 1 and W' = W + L1·L2
 * exactly as lqd computes it), target_modules, base_model_name_or_path, and lqd's own keys
 * "lqd_mode" and "lqd_init".
 *
 * Two modes, because LQ-LoRA and QLoRA adapt differently:
 *  - LQ_ADAPTER_REPLACE (LQ-LoRA): the adapter IS the low-rank part of an LQ model — serving
 *    with it replaces each matrix's own L1, L2 (W ≈ Q + L1'·L2'). Base for PEFT: Q alone.
 *  - LQ_ADAPTER_ADD (QLoRA-style, a fresh zero-initialized pair): added on top of the model
 *    as it is (W ≈ Q + L1·L2 + L1'·L2', or W + L1'·L2' for a dense model).
 * In REPLACE mode every linear has a pair of the model's own rank; in ADD mode a matrix may be
 * absent (rank 0 in struct lq_adapter) and gets nothing added. */
#ifndef LQ_ADAPTER_H
#define LQ_ADAPTER_H

#include <stddef.h>

#include "core/error.h"
#include "core/model.h"

enum lq_adapter_mode {
    LQ_ADAPTER_REPLACE, /* replaces the LQ model's own L1, L2 */
    LQ_ADAPTER_ADD,     /* added to the model's weights */
};
const char *lq_adapter_mode_name(enum lq_adapter_mode mode); /* "replace", "add" */

/* One linear's pair; rank 0 (and NULL factors): not adapted. */
struct lq_adapter_matrix {
    int rank;
    int rows, cols;
    float *L1; /* rows x rank, row-major (lora_B) (owned) */
    float *L2; /* rank x cols, row-major (lora_A) (owned) */
};

struct lq_adapter {
    enum lq_adapter_mode mode;
    int n_layers;
    struct lq_adapter_matrix *matrices; /* n_layers * LQ_LINEARS_PER_LAYER, layer-major, in
                                           enum lq_linear_kind order (owned) */
    char base_model[256];               /* base_model_name_or_path (informational) */
    char init[16];                      /* "lq" or "zero": how training started */
};

/* An empty adapter for n_layers (every matrix rank 0). Free with lq_adapter_free. */
int lq_adapter_create(int n_layers, enum lq_adapter_mode mode, struct lq_adapter **out,
                      struct lq_error *err);
void lq_adapter_free(struct lq_adapter *adapter);

/* The pair of layer l's matrix kind. */
struct lq_adapter_matrix *lq_adapter_matrix(struct lq_adapter *adapter, int layer,
                                            enum lq_linear_kind kind);

/* Writes dir/adapter_config.json and dir/adapter_model.safetensors. The directory is built
 * under a temporary name beside dir and renamed into place, so a reader never sees half an
 * adapter; an existing dir is replaced only when replace is 1 (else LQ_EINVAL). */
int lq_adapter_save(const struct lq_adapter *adapter, const char *dir, int replace,
                    struct lq_error *err);

/* Reads a PEFT LoRA directory (lqd's or PEFT's own, with lora_alpha/r folded into L1). Errors
 * name the file and tensor: missing or malformed files, non-LORA peft_type, unknown tensor
 * names, shapes that disagree with each other or with r, non-finite values. */
int lq_adapter_load(const char *dir, struct lq_adapter **out, struct lq_error *err);

/* LQ_EINVAL, with a message naming the first mismatch, unless adapter fits model: the same
 * number of layers, every pair's rows/cols equal to its linear's, and in REPLACE mode every
 * linear an LQ matrix with a pair of the same rank in the adapter. */
int lq_adapter_check(const struct lq_adapter *adapter, const struct lq_model *model,
                     struct lq_error *err);

#endif
