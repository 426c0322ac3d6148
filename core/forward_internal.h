/* The runtime and session internals shared by forward.c (one sequence) and forward_batch.c
 * (one decode step of many sequences). Nothing outside core/forward*.c includes this. */
#ifndef LQ_FORWARD_INTERNAL_H
#define LQ_FORWARD_INTERNAL_H

#include <pthread.h>

#include "core/forward.h"

/* One linear layer's low-rank pair on the device: L1 [rows, rank], L2 [rank, cols]. */
struct lq_lowrank_pair {
    int rank; /* 0: none */
    const float *L1, *L2;
};

struct lq_runtime {
    struct lq_backend *backend;
    struct lq_model *model;
    const float *embed, *final_norm, *lm_head;
    void *head; /* the backend's own copy of lm_head (head_prepare), or NULL: matmul on it */
    int embed_from_head; /* tied, and the backend embeds from head: embed is not read */
    const float **attn_norm, **ffn_norm;
    int prepared_layers; /* layers whose linears were prepared (for cleanup) */
    /* The model's own pairs as plain device arrays (n_layers * LQ_LINEARS_PER_LAYER), made
     * when the first REPLACE adapter is prepared: a batch mixing REPLACE rows with others runs
     * linear_base once and adds each row's pair, the bare rows' being these. Written once
     * under own_lock, before any session can use an adapter; read-only after. */
    pthread_mutex_t own_lock;
    struct lq_lowrank_pair *own;
};

struct lq_adapter_weights {
    struct lq_runtime *runtime;
    int replace;                   /* LQ_ADAPTER_REPLACE: the layer's own pair is left out */
    struct lq_lowrank_pair *pairs; /* n_layers * LQ_LINEARS_PER_LAYER, layer-major */
    size_t bytes;
};

/* Consecutive rows [first, first + count) of a forward call that use one adapter (NULL: the
 * bare model). */
struct lq_row_run {
    const struct lq_adapter_weights *adapter;
    int first, count;
};

/* y[n, rows] = x · Wᵀ for layer l's linear kind, each run of rows as its adapter changes W
 * (forward_adapter.c). With no adapter in any run it is exactly ops->linear. */
int lq_forward_linear(const struct lq_runtime *runtime, int layer, enum lq_linear_kind kind,
                      const struct lq_row_run *runs, int n_runs, const float *x, int n, float *y);

/* y[i] = lq_forward_linear(kinds[i], x) for i < count (the y[i] distinct and apart from x):
 * with no adapter in any run, one ops->linear_group call where the backend has it (the same
 * bits, the layers' work overlapped), else one layer after another. */
int lq_forward_linears(const struct lq_runtime *runtime, int layer,
                       const enum lq_linear_kind *kinds, int count, const struct lq_row_run *runs,
                       int n_runs, const float *x, int n, float *const *y);

/* Whether a step of n tokens on these runs takes ops->linear_fused: the backend has it and says
 * it pays at n, and no run has an adapter (an adapter's pairs need the input materialized). */
int lq_forward_fuses(const struct lq_runtime *runtime, const struct lq_row_run *runs, int n_runs,
                     int n);

/* ops->linear_fused for layer l's kinds[0 .. count) (see kernels/backend.h). */
int lq_forward_linears_fused(const struct lq_runtime *runtime, int layer,
                             const enum lq_linear_kind *kinds, int count,
                             const struct lq_linear_input *in, int n, float *const *y,
                             enum lq_linear_output output);

/* logits[n, vocab] = h[n, dim] · lm_headᵀ, by the backend's own head when it keeps one. */
static inline int lq_runtime_logits(const struct lq_runtime *runtime, const float *h, int n,
                                    float *logits) {
    struct lq_backend *b = runtime->backend;
    const struct lq_model_config *c = &runtime->model->config;
    if (runtime->head) return b->ops->head_matmul(b, runtime->head, h, n, logits);
    return b->ops->matmul(b, runtime->lm_head, c->vocab_size, c->dim, h, n, logits);
}

/* out[n, dim] = the embeddings of ids: rows of the backend's head copy when the model is tied
 * and the backend offers them, else of the embedding table. */
static inline int lq_runtime_embed(const struct lq_runtime *runtime, const int *ids, int n,
                                   float *out) {
    struct lq_backend *b = runtime->backend;
    if (runtime->embed_from_head) return b->ops->head_embed(b, runtime->head, ids, n, out);
    return b->ops->embed(b, runtime->embed, runtime->model->config.dim, ids, n, out);
}

/* Frees the runtime's own pairs (lq_runtime_free). */
void lq_runtime_free_own_pairs(struct lq_runtime *runtime);

struct lq_session {
    struct lq_runtime *runtime;
    int context, max_batch, position;
    float **k_cache, **v_cache;                /* per layer: [context, kv_dim] device buffers */
    float *x, *h, *q, *attn, *gate, *up, *out; /* activations, [max_batch, width] */
    float *logits;                             /* device [max_batch, vocab] */
    int *positions;                            /* host */
    const struct lq_adapter_weights *adapter;  /* NULL: the bare model */
};

#endif
