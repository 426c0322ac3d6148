/* One decode step of many sequences at once (continuous batching): the new token of every
 * sequence is stacked into one [n, dim] activation, so each linear layer reads its weights
 * once for the whole batch instead of once per sequence. Only RoPE (each token at its own
 * position) and attention (each sequence against its own KV cache) are per sequence.
 *
 * Every op here is applied to each row exactly as lq_session_forward applies it to a lone
 * token, so with a batch-invariant backend (the CPU's linear is, up to 64 tokens) a sequence
 * gets bit-identical logits whether it is decoded alone or in a batch. Sequences on different
 * adapters share the batch: lq_forward_linear (forward_adapter.c) runs each layer's shared
 * part once and every run of sequences' low-rank part after it.
 *
 * On a backend with decode-step graphs (kernels/backend.h: graph_begin, the *_device ops) the
 * step's per-step arguments (token ids, positions, every layer's KV-cache pointers) go to the
 * device in one copy, and the ops read them there; the step is then recorded under a key naming
 * everything else it depends on and replayed by later steps with the same key. Attention's
 * launch shape follows a power-of-two bound on the keys, not the positions, so a key holds for
 * many steps. */
#include "forward.h"
#include "forward_internal.h"

#include <stdint.h>
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
    /* Decode-step graphs (NULL step_args: the backend has none). step_args holds, for a step
     * of n, k-cache pointers [layers][n], v-cache pointers [layers][n], ids [n], positions [n];
     * step_host is its host image. */
    void *step_args;
    unsigned char *step_host;
    size_t step_bytes;
    uint64_t id; /* names this batch in graph keys (unique per process, unlike its address) */
};

/* Bytes of the step arguments of n sequences (see struct lq_batch). */
static size_t step_args_bytes(int layers, int n) {
    return 2 * (size_t)layers * n * sizeof(float *) + 2 * (size_t)n * sizeof(int);
}

static int has_graphs(const struct lq_runtime *runtime) {
    const struct lq_backend_ops *ops = runtime->backend->ops;
    return ops->graph_begin && ops->graph_end && ops->embed_device && ops->rope_device &&
           ops->attention_batch_device && !runtime->embed_from_head;
}

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
    if (!rc && has_graphs(runtime)) {
        static uint64_t batches; /* ids for graph keys */
        batch->id = __atomic_add_fetch(&batches, 1, __ATOMIC_RELAXED);
        batch->step_bytes = step_args_bytes(c->n_layers, max_sequences);
        rc = b->ops->buffer_alloc(b, batch->step_bytes, &batch->step_args, err);
        if (!rc && !(batch->step_host = malloc(batch->step_bytes)))
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
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
    if (batch->step_args) b->ops->buffer_free(b, batch->step_args);
    free(batch->step_host);
    free(batch->positions);
    free(batch->k_caches);
    free(batch->v_caches);
    free(batch->runs);
    free(batch);
}

int lq_batch_max_sequences(const struct lq_batch *batch) {
    return batch->max_sequences;
}

/* Where this step's per-step arguments are: on the host (batch->positions, k_caches, ...) or,
 * for graphs, in batch->step_args (device pointers into it). */
struct step_args {
    int device;
    const int *ids, *positions;               /* device, when device */
    float *const *k_caches, *const *v_caches; /* device [layers][n], when device */
    int keys_bound;
};

/* x += y, then h = rmsnorm(x, weight): one op where the backend fuses them. */
static int add_norm(struct lq_batch *batch, const float *y, const float *weight, int n) {
    const struct lq_model_config *c = &batch->runtime->model->config;
    struct lq_backend *b = batch->runtime->backend;
    if (b->ops->add_rmsnorm)
        return b->ops->add_rmsnorm(b, batch->x, y, weight, n, c->dim, c->norm_eps, batch->h);
    int rc = b->ops->add(b, batch->x, y, (size_t)n * c->dim);
    return rc ? rc : b->ops->rmsnorm(b, batch->x, weight, n, c->dim, c->norm_eps, batch->h);
}

/* One transformer block for the n stacked tokens. Unfused: from batch->h = its input norm of
 * batch->x, batch->x updated in place, and batch->h left holding `next_norm` of it (the next
 * block's input norm, or the final norm). Fused (lq_forward_fuses): from batch->x alone, the
 * norms taken inside the linears that read them, the residual adds inside the linears that
 * write them, SwiGLU inside up's (into gate): batch->x updated in place, batch->h
 * untouched. */
static int batch_block(struct lq_batch *batch, struct lq_session **sessions, int l, int n,
                       const struct step_args *args, const float *next_norm, int fused) {
    const struct lq_runtime *r = batch->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    const struct lq_backend_ops *ops = b->ops;
#define LINEAR(kind, x, y) lq_forward_linear(r, l, kind, batch->runs, batch->n_runs, x, n, y)
#define LINEARS(kinds, count, x, y)                                                                \
    lq_forward_linears(r, l, kinds, count, batch->runs, batch->n_runs, x, n, y)
    static const enum lq_linear_kind qkv[] = {LQ_Q_PROJ, LQ_K_PROJ, LQ_V_PROJ};
    static const enum lq_linear_kind gate_up[] = {LQ_GATE_PROJ, LQ_UP_PROJ};
    float *const qkv_out[] = {batch->q, batch->k, batch->v};
    float *const gate_up_out[] = {batch->gate, batch->up};
#define FUSED(kinds, count, input, y, output)                                                      \
    lq_forward_linears_fused(r, l, kinds, count, input, n, y, output)
    static const enum lq_linear_kind o_proj[] = {LQ_O_PROJ}, down_proj[] = {LQ_DOWN_PROJ};
    float *const residual[] = {batch->x};
    const struct lq_linear_input attn_in = {LQ_INPUT_RMSNORM, batch->x, r->attn_norm[l],
                                            c->norm_eps};
    const struct lq_linear_input o_in = {LQ_INPUT_PLAIN, batch->attn, NULL, 0.0f};
    const struct lq_linear_input ffn_in = {LQ_INPUT_RMSNORM, batch->x, r->ffn_norm[l], c->norm_eps};
    const struct lq_linear_input down_in = {LQ_INPUT_PLAIN, batch->gate, NULL, 0.0f};
    int rc = fused ? FUSED(qkv, 3, &attn_in, qkv_out, LQ_OUTPUT_WRITE)
                   : LINEARS(qkv, 3, batch->h, qkv_out);
    if (rc) return rc;
#define ROPE(x, heads)                                                                             \
    (args->device ? ops->rope_device(b, x, n, heads, c->head_dim, args->positions, c->rope_theta)  \
                  : ops->rope(b, x, n, heads, c->head_dim, batch->positions, c->rope_theta))
    /* the rotary embedding inside the attention op where the backend has that */
    const int rope_in_attention = args->device && ops->rope_attention_batch_device;
    if (!rope_in_attention) {
        if (args->device && ops->rope_qk_device)
            rc = ops->rope_qk_device(b, batch->q, c->n_heads, batch->k, c->n_kv_heads, n,
                                     c->head_dim, args->positions, c->rope_theta);
        else if (!(rc = ROPE(batch->q, c->n_heads)))
            rc = ROPE(batch->k, c->n_kv_heads);
        if (rc) return rc;
    }
#undef ROPE
    /* every sequence's new K, V rows into its own cache, and its attention, in one op */
    if (rope_in_attention) {
        rc = ops->rope_attention_batch_device(
            b, batch->q, batch->k, batch->v, args->k_caches + (size_t)l * n,
            args->v_caches + (size_t)l * n, args->positions, n, c->n_heads, c->n_kv_heads,
            c->head_dim, args->keys_bound, c->rope_theta, batch->attn);
    } else if (args->device) {
        rc = ops->attention_batch_device(
            b, batch->q, batch->k, batch->v, args->k_caches + (size_t)l * n,
            args->v_caches + (size_t)l * n, args->positions, n, c->n_heads, c->n_kv_heads,
            c->head_dim, args->keys_bound, batch->attn);
    } else {
        for (int i = 0; i < n; i++)
            batch->k_caches[i] = sessions[i]->k_cache[l],
            batch->v_caches[i] = sessions[i]->v_cache[l];
        rc = ops->attention_batch(b, batch->q, batch->k, batch->v, batch->k_caches, batch->v_caches,
                                  batch->positions, n, c->n_heads, c->n_kv_heads, c->head_dim,
                                  batch->attn);
    }
    if (rc) return rc;
    if (fused) {
        if ((rc = FUSED(o_proj, 1, &o_in, residual, LQ_OUTPUT_ADD)) ||
            (rc = FUSED(gate_up, 2, &ffn_in, gate_up_out, LQ_OUTPUT_SWIGLU)) ||
            (rc = FUSED(down_proj, 1, &down_in, residual, LQ_OUTPUT_ADD)))
            return rc;
        return LQ_OK;
    }
    if ((rc = LINEAR(LQ_O_PROJ, batch->attn, batch->out)) ||
        (rc = add_norm(batch, batch->out, r->ffn_norm[l], n)) ||
        (rc = LINEARS(gate_up, 2, batch->h, gate_up_out)) ||
        (rc = ops->swiglu(b, batch->gate, batch->up, (size_t)n * c->hidden_dim)) ||
        (rc = LINEAR(LQ_DOWN_PROJ, batch->gate, batch->out)) ||
        (rc = add_norm(batch, batch->out, next_norm, n)))
        return rc;
#undef FUSED
#undef LINEARS
#undef LINEAR
    return LQ_OK;
}

/* The step's ops, embedding to logits (left in batch->logits). */
static int run_step(struct lq_batch *batch, struct lq_session **sessions, const int *tokens, int n,
                    const struct step_args *args) {
    const struct lq_runtime *r = batch->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    int rc = args->device ? b->ops->embed_device(b, r->embed, c->dim, args->ids, n, batch->x)
                          : lq_runtime_embed(r, tokens, n, batch->x);
    const int fused = lq_forward_fuses(r, batch->runs, batch->n_runs, n);
    if (!rc && !fused)
        rc = b->ops->rmsnorm(b, batch->x, r->attn_norm[0], n, c->dim, c->norm_eps, batch->h);
    for (int l = 0; l < c->n_layers && !rc; l++)
        rc = batch_block(batch, sessions, l, n, args,
                         l + 1 < c->n_layers ? r->attn_norm[l + 1] : r->final_norm, fused);
    if (!rc && fused)
        rc = b->ops->rmsnorm(b, batch->x, r->final_norm, n, c->dim, c->norm_eps, batch->h);
    if (!rc) rc = lq_runtime_logits(r, batch->h, n, batch->logits);
    return rc;
}

/* FNV-1a over a key's words. */
static uint64_t key_mix(uint64_t hash, uint64_t word) {
    for (int i = 0; i < 8; i++, word >>= 8) hash = (hash ^ (word & 0xff)) * 0x100000001b3ull;
    return hash;
}

/* The step through the backend's graphs: its arguments to the device in one copy, then a
 * replay, or the ops run (and maybe recorded). */
static int graph_step(struct lq_batch *batch, struct lq_session **sessions, const int *tokens,
                      int n) {
    const struct lq_runtime *r = batch->runtime;
    const int layers = r->model->config.n_layers;
    struct lq_backend *b = r->backend;
    float **k = (float **)batch->step_host, **v = k + (size_t)layers * n;
    int *ids = (int *)(v + (size_t)layers * n), *positions = ids + n;
    int keys = 1;
    for (int i = 0; i < n; i++) {
        for (int l = 0; l < layers; l++) {
            k[(size_t)l * n + i] = sessions[i]->k_cache[l];
            v[(size_t)l * n + i] = sessions[i]->v_cache[l];
        }
        ids[i] = tokens[i], positions[i] = batch->positions[i];
        if (positions[i] + 1 > keys) keys = positions[i] + 1;
    }
    struct step_args args = {.device = 1, .keys_bound = 128};
    while (args.keys_bound < keys) args.keys_bound *= 2;
    float **device_k = (float **)batch->step_args, **device_v = device_k + (size_t)layers * n;
    args.k_caches = device_k, args.v_caches = device_v;
    args.ids = (const int *)(device_v + (size_t)layers * n), args.positions = args.ids + n;
    int rc =
        b->ops->copy_to_device(b, batch->step_args, batch->step_host, step_args_bytes(layers, n));
    if (rc) return rc;

    uint64_t key = 0xcbf29ce484222325ull;
    key = key_mix(key_mix(key_mix(key, batch->id), (uint64_t)n), (uint64_t)args.keys_bound);
    for (int i = 0; i < batch->n_runs; i++)
        key = key_mix(key_mix(key, (uint64_t)(uintptr_t)batch->runs[i].adapter),
                      (uint64_t)batch->runs[i].count);
    const int mode = b->ops->graph_begin(b, key);
    if (mode < 0) return mode;
    if (mode == LQ_GRAPH_REPLAYED) return LQ_OK;
    rc = run_step(batch, sessions, tokens, n, &args);
    if (mode == LQ_GRAPH_RECORDING && b->ops->graph_end(b, rc))
        rc = run_step(batch, sessions, tokens, n, &args); /* nothing ran: run it now */
    return rc;
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
    const struct step_args host_args = {0};
    int rc = batch->step_args ? graph_step(batch, sessions, tokens, n)
                              : run_step(batch, sessions, tokens, n, &host_args);
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
