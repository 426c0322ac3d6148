/* The runtime and session internals shared by forward.c (one sequence) and forward_batch.c
 * (one decode step of many sequences). Nothing outside core/forward*.c includes this. */
#ifndef LQ_FORWARD_INTERNAL_H
#define LQ_FORWARD_INTERNAL_H

#include "core/forward.h"

struct lq_runtime {
    struct lq_backend *backend;
    struct lq_model *model;
    const float *embed, *final_norm, *lm_head;
    const float **attn_norm, **ffn_norm;
    int prepared_layers; /* layers whose linears were prepared (for cleanup) */
};

struct lq_session {
    struct lq_runtime *runtime;
    int context, max_batch, position;
    float **k_cache, **v_cache;                /* per layer: [context, kv_dim] device buffers */
    float *x, *h, *q, *attn, *gate, *up, *out; /* activations, [max_batch, width] */
    float *logits;                             /* device [max_batch, vocab] */
    int *positions;                            /* host */
};

#endif
