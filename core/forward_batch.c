/* One decode step of many sequences at once (continuous batching): the new token of every
 * sequence is stacked into one [n, dim] activation, so each linear layer reads its weights
 * once for the whole batch instead of once per sequence. Only RoPE (each token at its own
 * position) and attention (each sequence against its own KV cache) are per sequence.
 *
 * Every op here is applied to each row exactly as lq_session_forward applies it to a lone
 * token, so with a batch-invariant backend (the CPU's linear is, up to 64 tokens) a sequence
 * gets bit-identical logits whether it is decoded alone or in a batch. Sequences on different
 * adapters share the batch: lq_forward_linear (forward_adapter.c) runs each layer's shared
 * part once and every run of sequences' low-rank part after it. */
#include "forward.h"
#include "forward_internal.h"

#include <stdlib.h>

struct lq_batch {
    struct lq_runtime *runtime;
    int max_sequences;
    float *x, *h, *q, *k, *v, *attn, *gate, *up, *out; /* device [max_sequences, width] */
    float *logits;                                     /* device [max_sequences, vocab] */
    int *positions;                                    /* host: each sequence's position */
    float **k_caches, **v_caches; /* host: one layer's cache of each sequence */
    struct lq_row_run *runs;      /* host: this step's runs of sequences on one adapter */
    int n_runs;
};

int lq_batch_create(struct lq_runtime *runtime, int max_sequences, struct lq_batch **out,
                    struct lq_error *err) {
    *out = NULL;
    if (max_sequences < 1)
        return lq_error_set(err, LQ_EINVAL, "batch of %d sequences: must be >= 1", max_sequences);
    const struct lq_model_config *c = &runtime->model->config;
    struct lq_backend *b = runtime->backend;
    struct lq_batch *batch = calloc(1, sizeof *batch);
    if (!batch) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    batch->runtime = runtime, batch->max_sequences = max_sequences;
    size_t n = (size_t)max_sequences, q_dim = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = q_dim > (size_t)c->dim ? q_dim : (size_t)c->dim;
    struct {
        float **buffer;
        size_t width;
    } buffers[] = {{&batch->x, widest},
                   {&batch->h, widest},
                   {&batch->q, q_dim},
                   {&batch->k, kv_dim},
                   {&batch->v, kv_dim},
                   {&batch->attn, widest},
                   {&batch->out, widest},
                   {&batch->gate, (size_t)c->hidden_dim},
                   {&batch->up, (size_t)c->hidden_dim},
                   {&batch->logits, (size_t)c->vocab_size}};
    int rc = 0;
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0] && !rc; i++)
        rc = b->ops->buffer_alloc(b, n * buffers[i].width * sizeof(float),
                                  (void **)buffers[i].buffer, err);
    if (!rc && (!(batch->positions = malloc(n * sizeof *batch->positions)) ||
                !(batch->k_caches = malloc(n * sizeof *batch->k_caches)) ||
                !(batch->v_caches = malloc(n * sizeof *batch->v_caches)) ||
                !(batch->runs = malloc(n * sizeof *batch->runs))))
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    if (rc) {
        lq_batch_free(batch);
        return rc;
    }
    *out = batch;
    return LQ_OK;
}

void lq_batch_free(struct lq_batch *batch) {
    if (!batch) return;
    struct lq_backend *b = batch->runtime->backend;
    float *buffers[] = {batch->x,    batch->h,   batch->q,    batch->k,  batch->v,
                        batch->attn, batch->out, batch->gate, batch->up, batch->logits};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
        if (buffers[i]) b->ops->buffer_free(b, buffers[i]);
    free(batch->positions);
    free(batch->k_caches);
    free(batch->v_caches);
    free(batch->runs);
    free(batch);
}

int lq_batch_max_sequences(const struct lq_batch *batch) {
    return batch->max_sequences;
}

/* One transformer block for the n stacked tokens (batch->x updated in place). */
static int batch_block(struct lq_batch *batch, struct lq_session **sessions, int l, int n) {
    const struct lq_runtime *r = batch->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    const struct lq_backend_ops *ops = b->ops;
#define LINEAR(kind, x, y) lq_forward_linear(r, l, kind, batch->runs, batch->n_runs, x, n, y)
    int rc;
    if ((rc = ops->rmsnorm(b, batch->x, r->attn_norm[l], n, c->dim, c->norm_eps, batch->h)) ||
        (rc = LINEAR(LQ_Q_PROJ, batch->h, batch->q)) ||
        (rc = LINEAR(LQ_K_PROJ, batch->h, batch->k)) ||
        (rc = LINEAR(LQ_V_PROJ, batch->h, batch->v)) ||
        (rc =
             ops->rope(b, batch->q, n, c->n_heads, c->head_dim, batch->positions, c->rope_theta)) ||
        (rc = ops->rope(b, batch->k, n, c->n_kv_heads, c->head_dim, batch->positions,
                        c->rope_theta)))
        return rc;
    /* every sequence's new K, V rows into its own cache, and its attention, in one op */
    for (int i = 0; i < n; i++)
        batch->k_caches[i] = sessions[i]->k_cache[l], batch->v_caches[i] = sessions[i]->v_cache[l];
    if ((rc = ops->attention_batch(b, batch->q, batch->k, batch->v, batch->k_caches,
                                   batch->v_caches, batch->positions, n, c->n_heads, c->n_kv_heads,
                                   c->head_dim, batch->attn)))
        return rc;
    if ((rc = LINEAR(LQ_O_PROJ, batch->attn, batch->out)) ||
        (rc = ops->add(b, batch->x, batch->out, (size_t)n * c->dim)) ||
        (rc = ops->rmsnorm(b, batch->x, r->ffn_norm[l], n, c->dim, c->norm_eps, batch->h)) ||
        (rc = LINEAR(LQ_GATE_PROJ, batch->h, batch->gate)) ||
        (rc = LINEAR(LQ_UP_PROJ, batch->h, batch->up)) ||
        (rc = ops->swiglu(b, batch->gate, batch->up, (size_t)n * c->hidden_dim)) ||
        (rc = LINEAR(LQ_DOWN_PROJ, batch->gate, batch->out)) ||
        (rc = ops->add(b, batch->x, batch->out, (size_t)n * c->dim)))
        return rc;
#undef LINEAR
    return LQ_OK;
}

int lq_forward_batch(struct lq_batch *batch, struct lq_session **sessions, const int *tokens, int n,
                     float *logits, struct lq_error *err) {
    const struct lq_runtime *r = batch->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    if (n < 1 || n > batch->max_sequences)
        return lq_error_set(err, LQ_EINVAL, "%d sequences in one step: 1..%d allowed", n,
                            batch->max_sequences);
    for (int i = 0; i < n; i++) {
        const struct lq_session *s = sessions[i];
        if (s->runtime != r)
            return lq_error_set(err, LQ_EINVAL, "sequence %d belongs to another model", i);
        if (s->position >= s->context)
            return lq_error_set(err, LQ_EINVAL, "sequence %d: context full (%d positions)", i,
                                s->context);
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return lq_error_set(err, LQ_EINVAL, "token %d is outside the vocabulary (%d)",
                                tokens[i], c->vocab_size);
        for (int j = 0; j < i; j++)
            if (sessions[j] == s)
                return lq_error_set(err, LQ_EINVAL, "sequence %d appears twice in the batch", i);
        batch->positions[i] = s->position;
    }
    /* runs of consecutive sequences on one adapter: each adds its low-rank part once */
    batch->n_runs = 0;
    for (int i = 0; i < n; i++) {
        struct lq_row_run *last = batch->n_runs ? &batch->runs[batch->n_runs - 1] : NULL;
        if (last && last->adapter == sessions[i]->adapter)
            last->count++;
        else
            batch->runs[batch->n_runs++] = (struct lq_row_run){sessions[i]->adapter, i, 1};
    }
    int rc = lq_runtime_embed(r, tokens, n, batch->x);
    for (int l = 0; l < c->n_layers && !rc; l++) rc = batch_block(batch, sessions, l, n);
    if (!rc) rc = b->ops->rmsnorm(b, batch->x, r->final_norm, n, c->dim, c->norm_eps, batch->h);
    if (!rc) rc = lq_runtime_logits(r, batch->h, n, batch->logits);
    if (!rc && logits) /* NULL: the caller reads them on the device */
        rc = b->ops->copy_to_host(b, logits, batch->logits,
                                  (size_t)n * c->vocab_size * sizeof(float));
    if (rc)
        return lq_error_set(err, rc, "batched forward pass failed on the %s backend", b->ops->name);
    for (int i = 0; i < n; i++) sessions[i]->position++;
    return LQ_OK;
}

const float *lq_batch_device_logits(const struct lq_batch *batch) {
    return batch->logits;
}
